"""Procedurally generated questions where a tool helps, fully determined by a few numbers.

A job's questions are not stored anywhere: a queue prompt carries a small dict
(:func:`task_data`: family, seed, image size) and every worker rebuilds the same question from it
(:func:`task_from_data`), image bytes included.

Family ``zoom_digits``: a square image with a noisy, textured background and a few distractor
shapes; somewhere in it a small framed box (8-12 % of the side) holds a two-digit number drawn
in a small font. The question asks which of four two-digit choices is the number; zooming into
the box (``image_zoom_in_tool``) makes it legible.

Pure Python and Pillow (no numpy, no torch). Deterministic: the same (family, seed, image_size)
give the same PNG bytes on the same Pillow version.

>>> task = generate_task("zoom_digits", seed=7, image_size=128)
>>> task.gold in task.choices
True
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from axpo.contracts.domain import AnswerKind, Image

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from axpo.settings.job import TaskSpec

LETTERS = ("A", "B", "C", "D")
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 4096
# The box's fill: brighter than anything else drawn, so the box stands out (and tests can
# find it).
BOX_FILL = (250, 250, 246)
BOX_FRAME = (20, 20, 20)
INK = (10, 10, 10)


@dataclass(frozen=True)
class Task:
    """One question: its image, the choices (letters) and the gold letter.

    ``box_1000`` is where the answer is, in 0-1000 relative coordinates (x1, y1, x2, y2), the
    zoom tool's coordinate system; ``answer_text`` is the number written there.
    """

    task_id: str
    question: str
    image: Image
    gold: str
    kind: AnswerKind
    choices: tuple[str, ...]
    box_1000: tuple[int, int, int, int]
    answer_text: str


# --------------------------------------------------------------------------- zoom_digits


def _rng(family: str, seed: int, image_size: int) -> random.Random:
    # A str seed is hashed with SHA-512 (not Python's salted hash): stable across processes.
    return random.Random(f"{family}:{seed}:{image_size}")


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


def _zoom_digits(seed: int, image_size: int) -> Task:
    from PIL import ImageDraw

    family = "zoom_digits"
    rng = _rng(family, seed, image_size)
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

    buf = io.BytesIO()
    img.save(buf, format="PNG")
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
        image=Image.from_bytes(buf.getvalue(), "image/png"),
        gold=LETTERS[gold_index],
        kind=AnswerKind.CHOICE,
        choices=LETTERS,
        box_1000=box,
        answer_text=text,
    )


_FAMILIES: dict[str, Callable[[int, int], Task]] = {"zoom_digits": _zoom_digits}


def families() -> tuple[str, ...]:
    """The known task families."""
    return tuple(sorted(_FAMILIES))


def generate_task(family: str, seed: int, image_size: int) -> Task:
    """The question of ``family`` number ``seed`` with an ``image_size`` square image.

    Raises ValueError for an unknown family or an image size outside [64, 4096].
    """
    make = _FAMILIES.get(family)
    if make is None:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(families())}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}"
        )
    return make(seed, image_size)


def choice_values(task: Task) -> dict[str, str]:
    """The text of each choice, read from the question (``{"A": "12", ...}``)."""
    found = dict(re.findall(r"\b([A-Z])\. (\S+?)(?=\.? [A-Z]\. |\. Answer|$)", task.question))
    return {letter: found[letter] for letter in task.choices if letter in found}


# --------------------------------------------------------------------------- queue payloads


def task_data(spec: TaskSpec, index: int) -> dict[str, Any]:
    """What a queued prompt carries for the ``index``-th question of a job (cycled over
    ``spec.count`` seeds): JSON-able, rebuilt by :func:`task_from_data`."""
    return {
        "family": spec.family,
        "seed": spec.seed + index % spec.count,
        "image_size": spec.image_size,
    }


def task_from_data(data: Mapping[str, Any]) -> Task:
    """Rebuild the task :func:`task_data` describes. Raises ValueError naming a missing or bad
    key."""
    expected: dict[str, type] = {"family": str, "seed": int, "image_size": int}
    values: dict[str, Any] = {}
    for key, kind in expected.items():
        if key not in data:
            raise ValueError(f"task data: missing key {key!r} (have {sorted(data)})")
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"task data: {key!r} must be {kind.__name__}, got {type(value).__name__}"
            )
        values[key] = value
    try:
        return generate_task(values["family"], values["seed"], values["image_size"])
    except ValueError as exc:
        raise ValueError(f"task data: {exc}") from exc
