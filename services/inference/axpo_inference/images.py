"""Images: how many placeholder tokens one expands to, and decoding with a cache by hash.

Prompts carry one *unexpanded* ``<|image_pad|>`` per image; vLLM expands it to
:func:`image_tokens` placeholders from the image itself. The engine counts them only to refuse
a prompt that would not fit ``max_model_len``. Decoded images are kept by SHA-256
(:class:`ImageCache`), so a later request may send ``Image(sha256=...)`` without bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from axpo.contracts.domain import Image
from axpo.settings.inference import InferenceSettings
from axpo_inference.errors import InvalidRequestError


def image_grid(config_dir: Path) -> tuple[int, int, int] | None:
    """(factor, min_pixels, max_pixels) of the checkpoint's Qwen-VL image processor, or None."""
    for name, key in (
        ("preprocessor_config.json", None),
        ("processor_config.json", "image_processor"),
    ):
        file = config_dir / name
        if not file.is_file():
            continue
        cfg = json.loads(file.read_text())
        if key is not None:
            cfg = cfg.get(key, {})
        if "patch_size" not in cfg:
            continue
        factor = int(cfg["patch_size"]) * int(cfg.get("merge_size", 2))
        size = cfg.get("size") or {}
        lo = int(size.get("shortest_edge", cfg.get("min_pixels", 56 * 56)))
        hi = int(size.get("longest_edge", cfg.get("max_pixels", 28 * 28 * 1280)))
        return factor, lo, hi
    return None


def image_tokens(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """Placeholder tokens one image expands to: Qwen-VL's resize to multiples of ``factor``
    within the pixel budget, then one token per ``factor``² pixels."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


class ImageCache:
    """Decoded images by SHA-256, so a request may reference an image sent before."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, sha: str) -> Any | None:
        with self._lock:
            img = self._items.get(sha)
            if img is not None:
                self._items.move_to_end(sha)
            return img

    def put(self, sha: str, img: Any) -> None:
        with self._lock:
            self._items[sha] = img
            self._items.move_to_end(sha)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


def decode_images(
    images: Sequence[Image], cache: ImageCache, settings: InferenceSettings
) -> list[Any]:
    """Decoded RGB PIL images; checks size limits before decoding, and the hash."""
    from PIL import Image as PILImage

    s = settings
    if len(images) > s.max_images_per_request:
        raise InvalidRequestError(
            f"images: {len(images)} images, at most {s.max_images_per_request} per request"
        )
    out = []
    for i, image in enumerate(images):
        if not image.data:
            cached = cache.get(image.sha256) if image.sha256 else None
            if cached is None:
                raise InvalidRequestError(
                    f"images[{i}].data: empty and sha256 {image.sha256[:12]!r} is not held "
                    "by this server (send the bytes)"
                )
            out.append(cached)
            continue
        if len(image.data) > s.max_image_bytes:
            raise InvalidRequestError(
                f"images[{i}].data: {len(image.data)} bytes, limit {s.max_image_bytes}"
            )
        sha = hashlib.sha256(image.data).hexdigest()
        if image.sha256 and image.sha256 != sha:
            raise InvalidRequestError(f"images[{i}].sha256: does not match the data")
        cached = cache.get(sha)
        if cached is not None:
            out.append(cached)
            continue
        try:
            with PILImage.open(io.BytesIO(image.data)) as img:
                w, h = img.size
                if w * h > s.max_image_pixels:
                    raise InvalidRequestError(
                        f"images[{i}]: {w}x{h} = {w * h} pixels, limit {s.max_image_pixels}"
                    )
                decoded = img.convert("RGB")
        except InvalidRequestError:
            raise
        except Exception as exc:  # Pillow raises many types for corrupt data
            raise InvalidRequestError(
                f"images[{i}].data: cannot decode image: {type(exc).__name__}: {exc}"
            ) from exc
        cache.put(sha, decoded)
        out.append(decoded)
    return out


def expanded_length(
    ids: Sequence[int], pil_images: Sequence[Any], grid: tuple[int, int, int] | None
) -> int:
    """Prompt length once vLLM expands each placeholder (``grid``: :func:`image_grid`; None:
    no image processor config, counted unexpanded)."""
    if grid is None:
        return len(ids)
    factor, lo, hi = grid
    extra = sum(image_tokens(img.width, img.height, factor, lo, hi) - 1 for img in pil_images)
    return len(ids) + extra
