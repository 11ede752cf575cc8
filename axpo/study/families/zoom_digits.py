"""``zoom_digits``: which of four numbers is written in a small box (the first family).

A square image with a noisy, textured background and a few distractor shapes; somewhere in it a
small framed box (8-12 % of the side) holds a two-digit number drawn in a small font. The
question asks which of four two-digit choices is the number; zooming into the box
(``image_zoom_in_tool``) makes it legible. A tiny model does not learn to read the digits in
minutes of CPU training (docs/platform.md), so this family exercises the machinery rather than
the study's claim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from axpo.contracts.domain import AnswerKind
from axpo.study.task import Task, png_bytes, rng_for

if TYPE_CHECKING:
    import random

    from PIL import Image as PILImage

LETTERS = ("A", "B", "C", "D")
# The box's fill: brighter than anything else drawn, so the box stands out (and tests can
# find it).
BOX_FILL = (250, 250, 246)
BOX_FRAME = (20, 20, 20)
INK = (10, 10, 10)


def _background(rng: random.Random, size: int) -> PILImage.Image:
    """A smooth colour field (a coarse random grid, upscaled) plus fine tiled noise."""
    from PIL import Image as PILImage
    from PIL import ImageChops

    grid = 6
    coarse = PILImage.frombytes(
        "RGB", (grid, grid), bytes(rng.randrange(70, 190) for _ in range(grid * grid * 3))
    )
    field = coarse.resize((size, size), PILImage.Resampling.BILINEAR)
    tile = 64
    noise_tile = PILImage.frombytes("L", (tile, tile), rng.randbytes(tile * tile))
    noise = PILImage.new("L", (size, size))
    for y in range(0, size, tile):
        for x in range(0, size, tile):
            noise.paste(noise_tile, (x, y))
    # Noise in [-24, +24] around the field: brightness = field + noise/5 - 25.
    noise_rgb = PILImage.merge("RGB", (noise, noise, noise)).point(lambda v: v // 5)
    bright = ImageChops.add(field, noise_rgb)
    return ImageChops.subtract(bright, PILImage.new("RGB", (size, size), (25, 25, 25)))


def _distractors(rng: random.Random, img: PILImage.Image) -> None:
    from PIL import ImageDraw

    size = img.width
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(4, 8)):
        color = tuple(rng.randrange(30, 220) for _ in range(3))
        w = rng.randrange(size // 12, size // 4)
        h = rng.randrange(size // 12, size // 4)
        x = rng.randrange(0, size - w)
        y = rng.randrange(0, size - h)
        shape = rng.choice(("ellipse", "rectangle", "line", "triangle"))
        if shape == "ellipse":
            draw.ellipse((x, y, x + w, y + h), fill=color)
        elif shape == "rectangle":
            draw.rectangle((x, y, x + w, y + h), fill=color)
        elif shape == "line":
            draw.line((x, y, x + w, y + h), fill=color, width=max(1, size // 64))
        else:
            draw.polygon(((x, y + h), (x + w // 2, y), (x + w, y + h)), fill=color)


def _font(px: int) -> Any:
    from PIL import ImageFont

    try:  # Pillow >= 10.1 with FreeType: the built-in font at any size
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def generate(seed: int, image_size: int) -> Task:
    from PIL import ImageDraw

    family = "zoom_digits"
    rng = rng_for(family, seed, image_size)
    img = _background(rng, image_size)
    _distractors(rng, img)

    side = max(14, round(image_size * rng.uniform(0.08, 0.12)))
    margin = max(2, image_size // 32)
    x1 = rng.randrange(margin, image_size - margin - side)
    y1 = rng.randrange(margin, image_size - margin - side)
    x2, y2 = x1 + side, y1 + side
    draw = ImageDraw.Draw(img)
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=BOX_FILL, outline=BOX_FRAME, width=1)

    numbers = rng.sample(range(10, 100), len(LETTERS))
    gold_index = rng.randrange(len(LETTERS))
    answer = numbers[gold_index]
    text = str(answer)
    # Small: about 4 % of the image side (10 px at 256), centred in the box.
    font = _font(max(8, round(image_size * 0.04)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tx = x1 + (side - (right - left)) / 2 - left
    ty = y1 + (side - (bottom - top)) / 2 - top
    draw.text((tx, ty), text, fill=INK, font=font)

    listed = " ".join(f"{letter}. {n}" for letter, n in zip(LETTERS, numbers, strict=True))
    question = (
        f"What number is written in the small box? Choices: {listed}. Answer with the letter."
    )
    box = (
        x1 * 1000 // image_size,
        y1 * 1000 // image_size,
        -(-x2 * 1000 // image_size),
        -(-y2 * 1000 // image_size),
    )
    return Task(
        task_id=f"{family}-{image_size}-{seed}",
        question=question,
        image=png_bytes(img),
        gold=LETTERS[gold_index],
        kind=AnswerKind.CHOICE,
        choices=LETTERS,
        box_1000=box,
        answer_text=text,
        family=family,
        seed=seed,
        tool="image_zoom_in_tool",
        tool_arguments={"bbox_2d": list(box), "label": "number box", "img_idx": 0},
        chance=1 / len(LETTERS),
    )
