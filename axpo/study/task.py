"""One generated question (:class:`Task`) and the train/held-out split of task seeds.

Every family (:mod:`axpo.study.families`) turns a seed into a :class:`Task`. Seeds below
:data:`HELDOUT_BASE` are training questions, seeds from it on are held-out questions, and each
family keeps the *content* of the two splits apart where it can repeat (which arithmetic
pairs, which knowledge-base entities), so a held-out question is never a training question
(tests check it).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from axpo.contracts.domain import AnswerKind, Image

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
HELDOUT_BASE = 1_000_000
"""The first held-out seed; training seeds are 0 .. HELDOUT_BASE - 1."""


@dataclass(frozen=True)
class Task:
    """One question: its text and image (``None`` for a text-only question), the gold answer
    and how to check it, and how a tool solves it.

    ``tool`` and ``tool_arguments`` are the call that reveals the answer (what a
    demonstration writes), ``answer_text`` what the tool's result says. ``chance`` is the
    accuracy of a guess without the tool: one over the answer space a guess draws from.
    ``box_1000`` (``zoom_digits``) is where the answer is, in 0-1000 coordinates.
    """

    task_id: str
    question: str
    image: Image | None
    gold: str
    kind: AnswerKind
    choices: tuple[str, ...] = ()
    box_1000: tuple[int, int, int, int] | None = None
    answer_text: str = ""
    family: str = ""
    seed: int = 0
    tool: str = ""
    tool_arguments: Mapping[str, Any] = field(default_factory=dict)
    chance: float = 0.0

    @property
    def images(self) -> tuple[Image, ...]:
        """The question's images (none or one)."""
        return () if self.image is None else (self.image,)

    @property
    def split(self) -> Split:
        return split_of(self.seed)


def split_of(seed: int) -> Split:
    """The split a task seed belongs to. Raises ValueError for a negative seed."""
    if seed < 0:
        raise ValueError(f"task seeds are >= 0, got {seed}")
    return "train" if seed < HELDOUT_BASE else "heldout"


def split_seeds(split: Split, count: int, start: int = 0) -> list[int]:
    """``count`` consecutive seeds of ``split``, from its ``start``-th one.

    Raises ValueError for an unknown split, a negative count or start, or a training range
    that would run into the held-out seeds.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got {count}, {start}")
    base = 0 if split == "train" else HELDOUT_BASE
    if split == "train" and start + count > HELDOUT_BASE:
        raise ValueError(f"training seeds end at {HELDOUT_BASE - 1}; asked up to {start + count}")
    return list(range(base + start, base + start + count))


def rng_for(family: str, seed: int, image_size: int) -> random.Random:
    """The family's random stream for one question. A str seed is hashed with SHA-512 (not
    Python's salted hash), so it is stable across processes."""
    return random.Random(f"{family}:{seed}:{image_size}")


def png_bytes(img: Any) -> Image:
    """A Pillow image as a PNG :class:`Image`."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")
