"""axpo.study.tasks: seeded questions whose images are rebuilt byte for byte from a small dict."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image as PILImage

from axpo.contracts.domain import AnswerKind
from axpo.settings.job import TaskSpec
from axpo.study.tasks import (
    BOX_FILL,
    choice_values,
    families,
    generate_task,
    task_data,
    task_from_data,
)

SIZE = 128


def test_same_seed_same_bytes_other_seed_other_image() -> None:
    a = generate_task("zoom_digits", 3, SIZE)
    b = generate_task("zoom_digits", 3, SIZE)
    assert a == b
    assert a.image.data == b.image.data
    assert a.image.data.startswith(b"\x89PNG")
    assert a.image.mime_type == "image/png"
    c = generate_task("zoom_digits", 4, SIZE)
    assert c.image.sha256 != a.image.sha256
    assert c.task_id != a.task_id
    assert generate_task("zoom_digits", 3, SIZE + 32).image.sha256 != a.image.sha256


@pytest.mark.parametrize("seed", range(6))
def test_gold_choice_is_the_number_in_the_question(seed: int) -> None:
    task = generate_task("zoom_digits", seed, SIZE)
    assert task.kind is AnswerKind.CHOICE
    assert task.choices == ("A", "B", "C", "D")
    assert task.gold in task.choices
    assert re.fullmatch(r"[1-9][0-9]", task.answer_text)
    values = choice_values(task)
    assert set(values) == set(task.choices)
    assert len(set(values.values())) == 4  # distinct
    assert values[task.gold] == task.answer_text
    assert f"{task.gold}. {task.answer_text}" in task.question
    assert task.question.endswith("Answer with the letter.")


def test_gold_position_varies_with_the_seed() -> None:
    assert len({generate_task("zoom_digits", s, 64).gold for s in range(20)}) >= 3


@pytest.mark.parametrize("seed", range(4))
def test_box_is_inside_the_image_and_small_and_visible(seed: int) -> None:
    task = generate_task("zoom_digits", seed, SIZE)
    x1, y1, x2, y2 = task.box_1000
    assert 0 <= x1 < x2 <= 1000
    assert 0 <= y1 < y2 <= 1000
    assert 60 <= x2 - x1 <= 140
    assert 60 <= y2 - y1 <= 140
    img = PILImage.open(io.BytesIO(task.image.data)).convert("RGB")
    assert img.size == (SIZE, SIZE)

    def is_fill(px: tuple[int, int, int]) -> bool:
        return all(abs(a - b) <= 3 for a, b in zip(px, BOX_FILL, strict=True))

    def pixels(box: tuple[int, int, int, int]) -> list[tuple[int, int, int]]:
        raw = img.crop(box).tobytes()
        return [(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]

    inside = pixels((x1 * SIZE // 1000, y1 * SIZE // 1000, x2 * SIZE // 1000, y2 * SIZE // 1000))
    inside_fill = sum(map(is_fill, inside)) / len(inside)
    everywhere_fill = sum(map(is_fill, pixels((0, 0, SIZE, SIZE)))) / (SIZE * SIZE)
    assert inside_fill > 0.3  # the box's pale fill (the rest: frame and digits)
    assert sum(map(is_fill, inside)) >= 0.9 * everywhere_fill * SIZE * SIZE  # only the box
    # Dark ink (digits) inside the box.
    assert any(max(px) < 80 for px in inside)


def test_unknown_family_and_bad_size() -> None:
    with pytest.raises(
        ValueError, match=r"unknown task family 'nope'; known: arith, colour_cell, town_facts"
    ):
        generate_task("nope", 0, SIZE)
    assert families() == ("arith", "colour_cell", "town_facts", "zoom_digits")
    with pytest.raises(ValueError, match="image_size"):
        generate_task("zoom_digits", 0, 16)


def test_task_data_round_trip_and_cycling() -> None:
    spec = TaskSpec(family="zoom_digits", count=3, seed=10, image_size=96)
    data = task_data(spec, 4)
    assert data == {"family": "zoom_digits", "seed": 11, "image_size": 96}
    assert [task_data(spec, i)["seed"] for i in range(7)] == [10, 11, 12, 10, 11, 12, 10]
    assert task_from_data(data) == generate_task("zoom_digits", 11, 96)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"seed": 1, "image_size": 64}, "missing key 'family'"),
        ({"family": "zoom_digits", "image_size": 64}, "missing key 'seed'"),
        ({"family": "zoom_digits", "seed": 1}, "missing key 'image_size'"),
        ({"family": "zoom_digits", "seed": "1", "image_size": 64}, "'seed' must be int"),
        ({"family": "zoom_digits", "seed": True, "image_size": 64}, "'seed' must be int"),
        ({"family": 3, "seed": 1, "image_size": 64}, "'family' must be str"),
        ({"family": "zoom_digits", "seed": 1, "image_size": 64.0}, "'image_size' must be int"),
        ({"family": "other", "seed": 1, "image_size": 64}, "unknown task family 'other'"),
        ({"family": "zoom_digits", "seed": 1, "image_size": 8}, "image_size must be in"),
    ],
)
def test_task_from_data_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        task_from_data(data)
