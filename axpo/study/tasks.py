"""Procedurally generated questions where a tool helps, fully determined by a few numbers.

A job's questions are not stored anywhere: a queue prompt carries a small dict
(:func:`task_data`: family, seed, image size) and every worker rebuilds the same question from it
(:func:`task_from_data`), image bytes included.

The families (one module each in :mod:`axpo.study.families`), one per group of the AXPO paper:

- ``colour_cell`` (perception): the colour of a grid cell, hidden by the model's pixel budget and
  revealed by ``image_zoom_in_tool``;
- ``arith`` (reasoning with code): a product of two-digit numbers, computed with ``python``;
- ``town_facts`` (search): a year found only in the bundled knowledge base, with ``search``;
- ``zoom_digits``: which of four numbers is written in a small box (the first family; a tiny
  model does not learn to read it).

Seeds below :data:`~axpo.study.task.HELDOUT_BASE` train, the rest are held out
(:func:`split_seeds`); every family keeps the two splits' content apart.

Pure Python and Pillow (no numpy, no torch). Deterministic: the same (family, seed, image_size)
give the same PNG bytes on the same Pillow version.

>>> task = generate_task("arith", seed=7, image_size=256)
>>> task.tool, int(task.gold) > 99
('python', True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from axpo.study.families import arith, colour_cell, town_facts, zoom_digits
from axpo.study.families.zoom_digits import BOX_FILL, LETTERS
from axpo.study.task import HELDOUT_BASE, SPLITS, Split, Task, split_of, split_seeds

if TYPE_CHECKING:
    from axpo.settings.job import TaskSpec

__all__ = [
    "BOX_FILL",
    "HELDOUT_BASE",
    "LETTERS",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "SPLITS",
    "Split",
    "Task",
    "choice_values",
    "families",
    "generate_task",
    "split_of",
    "split_seeds",
    "task_data",
    "task_from_data",
    "tasks_for",
]

MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 4096

_FAMILIES: dict[str, Callable[[int, int], Task]] = {
    "arith": arith.generate,
    "colour_cell": colour_cell.generate,
    "town_facts": town_facts.generate,
    "zoom_digits": zoom_digits.generate,
}
STUDY_FAMILIES = ("colour_cell", "arith", "town_facts")
"""The three families of the miniature study (docs/algorithm.md)."""


def families() -> tuple[str, ...]:
    """The known task families."""
    return tuple(sorted(_FAMILIES))


def generate_task(family: str, seed: int, image_size: int) -> Task:
    """The question of ``family`` number ``seed`` with an ``image_size`` square image (text-only
    families ignore the size).

    Raises ValueError for an unknown family, a negative seed or an image size outside
    [64, 4096] (or one the family cannot draw).
    """
    make = _FAMILIES.get(family)
    if make is None:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(families())}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}"
        )
    split_of(seed)  # rejects a negative seed
    return make(seed, image_size)


def tasks_for(
    family_names: Sequence[str], split: Split, count: int, image_size: int, start: int = 0
) -> list[Task]:
    """``count`` questions of each family in ``family_names`` from ``split``, interleaved
    (family 1's first, family 2's first, ...)."""
    seeds = split_seeds(split, count, start)
    return [generate_task(f, s, image_size) for s in seeds for f in family_names]


def choice_values(task: Task) -> dict[str, str]:
    """The text of each choice, read from the question (``{"A": "12", ...}``)."""
    import re

    found = dict(re.findall(r"\b([A-Z])\. (\S+?)(?=\.? [A-Z]\. |\. Answer|$)", task.question))
    return {letter: found[letter] for letter in task.choices if letter in found}


# --------------------------------------------------------------------------- queue payloads


def task_data(spec: TaskSpec, index: int) -> dict[str, Any]:
    """What a queued prompt carries for the ``index``-th question of a job: JSON-able, rebuilt
    by :func:`task_from_data`. The job's families take turns; each cycles over ``spec.count``
    seeds of ``spec.split`` from ``spec.seed`` on."""
    names = spec.family_names()
    family = names[index % len(names)]
    (seed,) = split_seeds(spec.split, 1, spec.seed + (index // len(names)) % spec.count)
    return {"family": family, "seed": seed, "image_size": spec.image_size}


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
