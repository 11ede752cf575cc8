"""Rendered demonstrations to training rows: token ids, loss mask, images.

Spans are tokenized one by one, so span boundaries are token boundaries, as in a rollout where
every turn is tokenized apart. The system turn (the first span) becomes the row's prefix, which
demonstrations usually share (:mod:`axpo_learner.sft.loss` runs it once per batch). Image
placeholders are expanded with the learner's own code (:class:`axpo_learner.batch.ImageEncoder`,
:func:`axpo_learner.batch.expand_placeholders`): the added tokens are never trained.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axpo_learner.batch import ImageEncoder, expand_placeholders, moved
from axpo_learner.sft.format import DemoFormatError, Demonstration, Span


def tokenize_spans(tokenizer: Any, spans: Sequence[Span]) -> tuple[list[int], list[bool]]:
    """Token ids (one ``<|image_pad|>`` per image) and the loss mask, span by span."""
    ids: list[int] = []
    mask: list[bool] = []
    for span in spans:
        piece = tokenizer(span.text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([span.train] * len(piece))
    return ids, mask


@dataclass
class SftRow:
    """One demonstration ready to train on: its prefix (the system turn's ids), the rest with
    image placeholders expanded and its loss mask, and its images' processor outputs."""

    prefix_ids: tuple[int, ...]
    token_ids: list[int]
    loss_mask: list[bool]
    pixel_values: list[torch.Tensor]
    image_grid_thw: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.prefix_ids) + len(self.token_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


class RowMaker:
    """Makes :class:`SftRow` values with one tokenizer and image encoder; keeps the last
    ``image_cache`` encoded images (demonstrations of one question share its image)."""

    def __init__(self, tokenizer: Any, encoder: ImageEncoder | None, image_cache: int = 256):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self._prefixes: dict[str, tuple[int, ...]] = {}
        self._images: OrderedDict[Path, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._image_cache = image_cache

    def prefix(self, demo: Demonstration) -> tuple[int, ...]:
        text = demo.spans[0].text
        if text not in self._prefixes:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._prefixes[text] = tuple(ids)
        return self._prefixes[text]

    def _encode(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.encoder is not None
        if path in self._images:
            self._images.move_to_end(path)
            return self._images[path]
        encoded = self.encoder.encode(path.read_bytes())
        self._images[path] = encoded
        if len(self._images) > self._image_cache:
            self._images.popitem(last=False)
        return encoded

    def _tokens(self, demo: Demonstration) -> tuple[list[int], list[bool]]:
        """Ids and loss mask after the system turn, checked (see :meth:`check`)."""
        if demo.spans[0].train:
            raise DemoFormatError(f"{demo.where}: the system turn must not be trained")
        ids, mask = tokenize_spans(self.tokenizer, demo.spans[1:])
        if mask and mask[0]:
            raise DemoFormatError(f"{demo.where}: the first token after the system turn is trained")
        if self.encoder is None:
            if demo.images:
                raise DemoFormatError(f"{demo.where}: has images; the model has no image processor")
            return ids, mask
        image_token = self.encoder.image_token_id
        placeholders = [m for t, m in zip(ids, mask, strict=True) if t == image_token]
        if any(placeholders):
            raise DemoFormatError(f"{demo.where}: an image placeholder is inside a trained span")
        if len(placeholders) != len(demo.images):
            raise DemoFormatError(
                f"{demo.where}: {len(placeholders)} image placeholders in the text for "
                f"{len(demo.images)} images (is an image token written out in the text?)"
            )
        return ids, mask

    def check(self, demo: Demonstration) -> None:
        """Raise :class:`DemoFormatError` (naming the demonstration) if ``demo`` cannot become
        a row: a trained system turn or first token, an image placeholder in a trained span,
        placeholders that do not match the images, images for a model without an image
        processor. Tokenizes only (no image is read), so a whole file is checked quickly."""
        self._tokens(demo)

    def make(self, demo: Demonstration) -> SftRow:
        """The row of ``demo`` (errors: :meth:`check`)."""
        ids, mask = self._tokens(demo)
        if not demo.images:
            return SftRow(self.prefix(demo), ids, mask, [], [])
        assert self.encoder is not None
        encoded = [self._encode(p) for p in demo.images]
        expanded, where = expand_placeholders(
            ids, self.encoder.image_token_id, [self.encoder.tokens(grid) for _, grid in encoded]
        )
        return SftRow(
            self.prefix(demo),
            list(expanded),
            list(moved(mask, where, len(expanded), False)),
            [pv for pv, _ in encoded],
            [grid for _, grid in encoded],
        )
