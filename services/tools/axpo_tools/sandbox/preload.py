# Zygote side: imported before pivot_root hides this package, so never import from it lazily.
"""What a warm zygote imports once, before it forks any child: numpy, PIL and common
standard modules, so a request costs a fork, not their import."""

from __future__ import annotations

import contextlib
import importlib
import sys

__all__ = ["PRELOAD", "import_preloaded"]

PRELOAD = (
    "numpy",
    "PIL.Image",
    "PIL.ImageDraw",
    "PIL.ImageFont",
    "PIL.ImageFilter",
    "PIL.ImageOps",
    "PIL.ImageEnhance",
    "PIL.ImageChops",
    "PIL.ImageStat",
    "PIL.ImageColor",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "base64",
    "bisect",
    "cmath",
    "collections",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "io",
    "itertools",
    "json",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
)


def import_preloaded() -> None:
    """Import :data:`PRELOAD` (what is missing is skipped) and register PIL's plugins."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    pil_image = sys.modules.get("PIL.Image")
    if pil_image is not None:
        pil_image.init()
