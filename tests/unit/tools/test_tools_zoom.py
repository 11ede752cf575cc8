"""Crop/zoom on generated images: the crop shows the pixels it should; bad input is refused."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image as PILImage

from axpo.contracts.domain import Image, ToolErrorKind
from axpo.settings.tools import ZoomSettings
from axpo_tools.errors import ToolFailure
from axpo_tools.zoom import ZoomTool, output_size

RED, BLUE, GREY = (220, 20, 20), (20, 20, 220), (128, 128, 128)


def png(img: PILImage.Image) -> Image:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


def scene(width: int = 1000, height: int = 600) -> Image:
    """Grey canvas with a red block at x 100-200, y 300-400 and a blue block at 700-900,
    50-150 (pixels)."""
    img = PILImage.new("RGB", (width, height), GREY)
    img.paste(RED, (100, 300, 200, 400))
    img.paste(BLUE, (700, 50, 900, 150))
    return png(img)


def decode(image: Image) -> PILImage.Image:
    return PILImage.open(io.BytesIO(image.data)).convert("RGB")


def near(pixel: tuple[int, ...], colour: tuple[int, int, int], tol: int = 12) -> bool:
    """JPEG (the default output) moves colours a little."""
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True))


def centre(img: PILImage.Image) -> tuple[int, ...]:
    return img.getpixel((img.width // 2, img.height // 2))


@pytest.fixture
def zoom() -> ZoomTool:
    return ZoomTool(ZoomSettings())


def test_relative_coordinates_crop_the_right_pixels(zoom):
    # red block in relative 0-1000 coordinates: x 100/1000*1000, y 300/600*1000
    result = zoom({"bbox_2d": [100, 500, 200, 667], "label": "red"}, [scene()])
    (out,) = result.images
    crop = decode(out)
    assert near(centre(crop), RED)
    assert not any(near(c, BLUE, 60) for _, c in crop.getcolors(maxcolors=1 << 20))
    assert "red" in result.text


def test_pixel_coordinates_option(zoom):
    pixels = ZoomTool(ZoomSettings(coordinates="pixels"))
    crop = decode(pixels({"bbox_2d": [700, 50, 900, 150], "label": "b"}, [scene()]).images[0])
    assert near(centre(crop), BLUE)
    same = decode(zoom({"bbox_2d": [700, 83.4, 900, 250], "label": "b"}, [scene()]).images[0])
    assert same.size == crop.size


@pytest.mark.parametrize(("w", "h"), [(10, 10), (50, 400), (1000, 1000), (3000, 200), (7, 3000)])
def test_output_sizes_respect_factor_and_budget(w, h):
    s = ZoomSettings()
    ow, oh = output_size(w, h, s)
    assert ow % s.factor == 0
    assert oh % s.factor == 0
    assert ow * oh <= s.max_pixels
    assert ow * oh >= min(s.min_pixels, s.max_pixels) or ow * oh + s.factor * max(ow, oh) > (
        s.max_pixels
    )


def test_small_crops_are_upscaled_to_min_pixels(zoom):
    out = decode(zoom({"bbox_2d": [100, 500, 120, 520], "label": "tiny"}, [scene()]).images[0])
    assert out.width * out.height >= ZoomSettings().min_pixels
    assert near(centre(out), RED)


def test_img_idx_addresses_earlier_crops(zoom):
    first = zoom({"bbox_2d": [600, 0, 1000, 333], "label": "blue area"}, [scene()]).images[0]
    images = [scene(), first]
    again = decode(
        zoom({"bbox_2d": [250, 150, 750, 450], "label": "b", "img_idx": 1}, images).images[0]
    )
    assert near(centre(again), BLUE)


def test_partially_outside_box_is_clamped(zoom):
    result = zoom({"bbox_2d": [-50, -50, 150, 1100], "label": "left strip"}, [scene()])
    assert "region [0, 0, 150, 600]" in result.text


@pytest.mark.parametrize(
    ("bbox", "message"),
    [
        ([200, 100, 100, 300], "inverted or empty"),
        ([100, 100, 100, 300], "inverted or empty"),
        ([5000, 5000, 6000, 6000], "far outside"),
        ([-3000, 0, -2000, 10], "far outside"),
        ([1000, 1000, 1500, 1500], "outside the image"),
        ([float("nan"), 0, 10, 10], "finite"),
        ([1, 2, 3], "four numbers"),
        (["a", 2, 3, 4], "four numbers"),
        ([True, 0, 10, 10], "four numbers"),
    ],
    ids=["inverted", "empty", "far", "far-negative", "outside", "nan", "three", "string", "bool"],
)
def test_bad_boxes_are_refused_with_a_message(zoom, bbox, message):
    with pytest.raises(ToolFailure) as err:
        zoom({"bbox_2d": bbox, "label": "x"}, [scene()])
    assert err.value.kind is ToolErrorKind.BAD_ARGUMENTS
    assert message in err.value.message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"bbox_2d": [0, 0, 10, 10], "label": "x", "img_idx": 2}, "out of range"),
        ({"bbox_2d": [0, 0, 10, 10], "label": "x", "img_idx": "0"}, "integer"),
        ({"bbox_2d": [0, 0, 10, 10], "label": 3}, "label"),
    ],
    ids=["idx-range", "idx-type", "label-type"],
)
def test_bad_arguments(zoom, args, message):
    with pytest.raises(ToolFailure, match=message):
        zoom(args, [scene()])


def test_no_images(zoom):
    with pytest.raises(ToolFailure, match="no image"):
        zoom({"bbox_2d": [0, 0, 10, 10], "label": "x"}, [])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not an image at all", "cannot decode"),
        (b"", "no bytes"),
    ],
    ids=["garbage", "empty"],
)
def test_undecodable_images(zoom, data, message):
    image = Image.from_bytes(data, "image/png")
    with pytest.raises(ToolFailure, match=message):
        zoom({"bbox_2d": [0, 0, 10, 10], "label": "x"}, [image])


def test_truncated_png_is_refused(zoom):
    data = scene().data
    truncated = Image.from_bytes(data[: len(data) // 2], "image/png")
    with pytest.raises(ToolFailure, match="cannot decode"):
        zoom({"bbox_2d": [0, 0, 10, 10], "label": "x"}, [truncated])


def test_decompression_bomb_is_refused_before_decoding(zoom):
    bomb = png(PILImage.new("1", (10_000, 10_000)))  # 100 M pixels, a few KB of PNG
    assert len(bomb.data) < 200_000
    with pytest.raises(ToolFailure) as err:
        zoom({"bbox_2d": [0, 0, 10, 10], "label": "x"}, [bomb])
    assert err.value.kind is ToolErrorKind.RESOURCE_LIMIT
    assert "100,000,000 pixels" in err.value.message


def test_hash_must_match_bytes(zoom):
    real = scene()
    forged = Image(sha256="0" * 64, data=real.data, mime_type="image/png")
    with pytest.raises(ToolFailure, match="sha256 does not match"):
        zoom({"bbox_2d": [0, 0, 10, 10], "label": "x"}, [forged])


def test_decoded_images_are_cached_by_hash(zoom):
    image = scene()
    zoom({"bbox_2d": [0, 0, 500, 500], "label": "x"}, [image])
    by_reference = zoom({"bbox_2d": [100, 500, 200, 667], "label": "x"}, [image.reference()])
    crop = decode(by_reference.images[0])
    assert near(centre(crop), RED)


def test_spec_is_the_qwen3_vl_schema(zoom):
    spec = zoom.spec()
    assert spec["function"]["name"] == "image_zoom_in_tool"
    params = spec["function"]["parameters"]
    assert params["required"] == ["bbox_2d", "label"]
    assert set(params["properties"]) == {"bbox_2d", "label", "img_idx"}
    json.dumps(spec)  # serializable as rendered into the system prompt


def test_default_output_is_jpeg(zoom):
    out = zoom({"bbox_2d": [0, 0, 500, 500], "label": "x"}, [scene()]).images[0]
    assert out.mime_type == "image/jpeg"
    assert out.data[:3] == b"\xff\xd8\xff"


def test_lossless_png_option_keeps_exact_pixels():
    tool = ZoomTool(ZoomSettings(output_format="png"))
    out = tool({"bbox_2d": [100, 500, 200, 667], "label": "red"}, [scene()]).images[0]
    assert out.mime_type == "image/png"
    assert centre(decode(out)) == RED
