"""Crop/zoom: Qwen3-VL's ``image_zoom_in_tool`` on any image of the trajectory.

Arguments follow the official schema: ``bbox_2d`` = [x1, y1, x2, y2] (top-left, bottom-right)
in relative 0-1000 coordinates (or pixels, configurable), ``label``, ``img_idx`` (index among
every image of the conversation so far, earlier crops included; default 0).

Box rules, in order: four finite numbers; coordinates far outside the image (more than one
image size beyond an edge) are rejected as absurd; an inverted box (x2 <= x1 or y2 <= y1) is
rejected; the rest is clamped to the image, and a box that is empty after clamping is rejected.
A side shorter than ``min_side`` pixels is expanded around its centre. The crop is then resized
so its sides are multiples of ``factor`` and its area lies in [min_pixels, max_pixels].

Source images are decoded once per content hash and kept in a small LRU cache: the rollouts
of one question all zoom into the same image.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image as PILImage

from axpo.contracts.domain import Image, ToolErrorKind, ToolResult
from axpo.settings.tools import ZoomSettings
from axpo_tools.errors import ToolFailure

NAME = "image_zoom_in_tool"
_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


def decode_image(data: bytes, max_pixels: int) -> PILImage.Image:
    """Decode to RGB, refusing non-images and anything over ``max_pixels`` before decoding."""
    if not data:
        raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, "image has no bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ToolFailure(
                    ToolErrorKind.RESOURCE_LIMIT,
                    f"image is {width}x{height} = {width * height:,} pixels; the limit is "
                    f"{max_pixels:,}",
                )
            if img.format not in _FORMATS:
                raise ToolFailure(
                    ToolErrorKind.BAD_ARGUMENTS, f"unsupported image format {img.format}"
                )
            img.load()
            return img.convert("RGB")
    except ToolFailure:
        raise
    except PILImage.DecompressionBombError as exc:  # over twice Pillow's own limit
        raise ToolFailure(ToolErrorKind.RESOURCE_LIMIT, f"image refused: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ToolFailure(
            ToolErrorKind.BAD_ARGUMENTS, f"cannot decode image: {type(exc).__name__}: {exc}"
        ) from exc


def output_size(width: int, height: int, settings: ZoomSettings) -> tuple[int, int]:
    """Size to resize a ``width`` x ``height`` crop to: sides multiples of ``factor``, area in
    [min_pixels, max_pixels], aspect ratio kept as closely as the rounding allows."""
    f = settings.factor
    area = width * height
    scale = 1.0
    if area < settings.min_pixels:
        scale = math.sqrt(settings.min_pixels / area)
    elif area > settings.max_pixels:
        scale = math.sqrt(settings.max_pixels / area)
    w = max(f, round(width * scale / f) * f)
    h = max(f, round(height * scale / f) * f)
    while w * h > settings.max_pixels and (w > f or h > f):  # rounding up overshot the budget
        if w >= h:
            w -= f
        else:
            h -= f
    while w * h < settings.min_pixels and (w + f) * h <= settings.max_pixels:
        if w <= h:
            w += f
        else:
            h += f
    return w, h


class ZoomTool:
    """``image_zoom_in_tool``. Thread-safe."""

    name = NAME

    def __init__(self, settings: ZoomSettings) -> None:
        self.settings = settings
        self._cache: OrderedDict[str, PILImage.Image] = OrderedDict()
        self._lock = threading.Lock()

    def spec(self) -> dict[str, Any]:
        unit = (
            "relative coordinates from 0 to 1000"
            if self.settings.coordinates == "relative_1000"
            else "pixel coordinates"
        )
        return {
            "type": "function",
            "function": {
                "name": NAME,
                "description": "Zoom in on a region of an image by cropping it to a bounding "
                "box; returns the enlarged region as a new image.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "bbox_2d": {
                            "type": "array",
                            "items": {"type": "number"},
                            "minItems": 4,
                            "maxItems": 4,
                            "description": f"[x1, y1, x2, y2]: top-left and bottom-right "
                            f"corners, in {unit}.",
                        },
                        "label": {
                            "type": "string",
                            "description": "Name of the object or region to zoom in on.",
                        },
                        "img_idx": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Index of the image to zoom into, counting "
                            "every image so far from 0 (earlier crops included).",
                        },
                    },
                    "required": ["bbox_2d", "label"],
                },
            },
        }

    # ------------------------------------------------------------------ decoding

    def _decoded(self, image: Image) -> PILImage.Image:
        with self._lock:
            cached = self._cache.get(image.sha256)
            if cached is not None:
                self._cache.move_to_end(image.sha256)
                return cached
        if image.data and hashlib.sha256(image.data).hexdigest() != image.sha256:
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS,
                f"image {image.sha256[:12]}...: sha256 does not match its bytes",
            )
        decoded = decode_image(image.data, self.settings.max_input_pixels)
        if self.settings.decoded_cache_images:
            with self._lock:
                self._cache[image.sha256] = decoded
                while len(self._cache) > self.settings.decoded_cache_images:
                    self._cache.popitem(last=False)
        return decoded

    # ------------------------------------------------------------------ the box

    def pixel_box(self, bbox: Sequence[Any], width: int, height: int) -> tuple[int, int, int, int]:
        """The crop box in pixels, after the rules in the module docstring."""
        if len(bbox) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in bbox
        ):
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS,
                f"bbox_2d must be four numbers [x1, y1, x2, y2], got {bbox!r}",
            )
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, "bbox_2d values must be finite")
        if self.settings.coordinates == "relative_1000":
            span_x = span_y = 1000.0
            x1, x2 = x1 / 1000 * width, x2 / 1000 * width
            y1, y2 = y1 / 1000 * height, y2 / 1000 * height
            unit = "relative 0-1000"
        else:
            span_x, span_y = float(width), float(height)
            unit = f"pixels of a {width}x{height} image"
        if (
            min(x1, x2) > 2 * width
            or max(x1, x2) < -width
            or min(y1, y2) > 2 * height
            or max(y1, y2) < -height
        ):
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS,
                f"bbox_2d {list(bbox)} is far outside the image (coordinates are "
                f"{unit}: x in [0, {span_x:g}], y in [0, {span_y:g}])",
            )
        if x2 <= x1 or y2 <= y1:
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS,
                f"bbox_2d {list(bbox)} is inverted or empty: need x1 < x2 and "
                f"y1 < y2 ([x1, y1, x2, y2] = top-left, bottom-right)",
            )
        left, top = max(0.0, x1), max(0.0, y1)
        right, bottom = min(float(width), x2), min(float(height), y2)
        if right - left < 1 or bottom - top < 1:
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS, f"bbox_2d {list(bbox)} lies outside the image ({unit})"
            )
        left, right = _expand(left, right, self.settings.min_side, width)
        top, bottom = _expand(top, bottom, self.settings.min_side, height)
        return (math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom))

    # ------------------------------------------------------------------ the call

    def __call__(self, arguments: Mapping[str, Any], images: Sequence[Image]) -> ToolResult:
        idx = arguments.get("img_idx", 0)
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS, f"img_idx must be an integer, got {idx!r}"
            )
        if not images:
            raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, "there is no image to zoom into")
        if not 0 <= idx < len(images):
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS,
                f"img_idx {idx} is out of range: there are {len(images)} images "
                f"(0 to {len(images) - 1})",
            )
        label = arguments.get("label", "")
        if not isinstance(label, str):
            raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, "label must be a string")
        source = self._decoded(images[idx])
        box = self.pixel_box(arguments.get("bbox_2d", ()), *source.size)
        crop = source.crop(box)
        size = output_size(crop.width, crop.height, self.settings)
        if size != crop.size:
            crop = crop.resize(size, PILImage.Resampling.BICUBIC)
        buf = io.BytesIO()
        if self.settings.output_format == "png":
            crop.save(buf, "PNG", compress_level=1)
            mime = "image/png"
        else:
            crop.save(buf, "JPEG", quality=self.settings.jpeg_quality)
            mime = "image/jpeg"
        what = f" {label!r}" if label else ""
        text = (
            f"Zoomed in on{what}: region {list(box)} of image {idx} "
            f"({source.width}x{source.height} px), shown at {size[0]}x{size[1]}."
        )
        return ToolResult(text=text, images=(Image.from_bytes(buf.getvalue(), mime),))


def _expand(lo: float, hi: float, min_side: int, limit: int) -> tuple[float, float]:
    """Grow [lo, hi] to at least ``min_side`` around its centre, staying inside [0, limit]."""
    if hi - lo >= min_side or limit <= min_side:
        return (lo, hi) if limit > min_side else (0.0, float(limit))
    centre = (lo + hi) / 2
    lo = min(max(0.0, centre - min_side / 2), limit - min_side)
    return lo, lo + min_side
