"""Micro-batches from groups: token ids, loss mask, rollout logprobs and per-token advantages.

Advantages and loss masks come from :mod:`axpo.algorithm`. Rows are packed into micro-batches
whose padded size (rows x longest row) stays within a token budget; a row longer than the
budget gets a micro-batch of its own.

Images: a trajectory's ``token_ids`` hold one unexpanded ``<|image_pad|>`` per image, as the
rollout sent them to vLLM. Each row expands every placeholder to the image's token count
(``t*h*w / merge**2`` from the image processor's grid) and moves its per-token arrays along:
tokens keep their values at their shifted positions, the added placeholder tokens get loss
mask False and logprob 0. The row carries its images' ``pixel_values`` and ``image_grid_thw``,
so a micro-batch holds exactly the images of its rows, and the budget counts expanded length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from axpo import algorithm
from axpo.contracts.domain import Group, Image, LogprobProcessing, Trajectory
from axpo.settings.job import AlgorithmSpec


@dataclass(frozen=True)
class Row:
    """One trajectory, ready to train on (image placeholders expanded)."""

    group_id: str
    trajectory_id: str
    token_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    rollout_logprobs: tuple[float, ...]
    advantage: float
    # [patches, channels*temporal*patch*patch] and [images, 3] (t, h, w in patches); None
    # for a text-only row.
    pixel_values: torch.Tensor | None = field(default=None, compare=False, repr=False)
    image_grid_thw: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # The policy version the group was sampled with (its oldest turn's).
    policy_version: int = 0
    # How the engine computed rollout_logprobs (the group's); the learner's logprobs follow it.
    processing: LogprobProcessing = field(default_factory=LogprobProcessing)


@dataclass
class MicroBatch:
    """Right-padded ``[rows, time]`` tensors. ``loss_mask`` is 0 on padding. With images:
    their ``pixel_values``/``image_grid_thw`` in row order, and ``mm_token_type_ids`` (1 on
    image tokens, else 0) for the model's M-RoPE positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    rows: list[Row]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> MicroBatch:
        """The same batch with every tensor on ``device`` (itself on CPU). Host tensors are
        pinned first, so the copies to a GPU are asynchronous."""
        if device.type == "cpu":
            return self
        cuda = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)

        def maybe(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else move(t)

        return dataclasses.replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            loss_mask=move(self.loss_mask),
            rollout_logprobs=move(self.rollout_logprobs),
            advantages=move(self.advantages),
            pixel_values=maybe(self.pixel_values),
            image_grid_thw=maybe(self.image_grid_thw),
            mm_token_type_ids=maybe(self.mm_token_type_ids),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        images = {
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        out.update((k, v) for k, v in images.items() if v is not None)
        return out


# --------------------------------------------------------------------------- images


class ImageEncoder:
    """A processor's image side: decodes images and runs the image processor, one image at a
    time (each image is resized on its own, so this equals processing them together)."""

    def __init__(self, processor: Any) -> None:
        self.image_processor = processor.image_processor
        tokenizer = getattr(processor, "tokenizer", processor)
        token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(token))
        self.merge_size = int(self.image_processor.merge_size)

    @classmethod
    def from_processor(cls, processor: Any) -> ImageEncoder | None:
        """None for a processor without an image processor (a text-only model)."""
        return cls(processor) if getattr(processor, "image_processor", None) is not None else None

    def encode(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values [patches, dim]`` and ``image_grid_thw [1, 3]`` of one encoded image."""
        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        out = self.image_processor(images=[rgb], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tokens(self, grid_thw: torch.Tensor) -> int:
        """Placeholder tokens one image expands to."""
        return int(grid_thw.prod()) // self.merge_size**2


def expand_placeholders(
    token_ids: Sequence[int], image_token_id: int, counts: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Expand the i-th ``image_token_id`` to ``counts[i]`` copies. Returns the new ids and,
    for every old position, its new position.

    >>> expand_placeholders([5, 9, 6, 9, 7], 9, [3, 2])
    ((5, 9, 9, 9, 6, 9, 9, 7), (0, 1, 4, 5, 7))
    """
    found = sum(1 for t in token_ids if t == image_token_id)
    if found != len(counts):
        raise ValueError(
            f"{found} image placeholders in token_ids for {len(counts)} images "
            "(token_ids must hold one unexpanded placeholder per image)"
        )
    ids: list[int] = []
    where: list[int] = []
    k = 0
    for t in token_ids:
        where.append(len(ids))
        if t == image_token_id:
            if counts[k] < 1:
                raise ValueError(f"image {k} expands to {counts[k]} tokens")
            ids.extend([t] * counts[k])
            k += 1
        else:
            ids.append(t)
    return tuple(ids), tuple(where)


def moved(values: Sequence[Any], where: Sequence[int], n: int, fill: Any) -> tuple[Any, ...]:
    """A per-token array moved along an expansion: ``values[i]`` goes to ``where[i]`` (from
    :func:`expand_placeholders`) in an array of ``n``; the added positions get ``fill``.

    >>> moved([1, 2, 3], (0, 1, 4), 5, 0)
    (1, 2, 0, 0, 3)
    """
    out = [fill] * n
    for v, j in zip(values, where, strict=True):
        out[j] = v
    return tuple(out)


def _image_bytes(g: Group, t: Trajectory) -> Callable[[str], bytes]:
    """Looks up an image's bytes by hash: the group's images, then the trajectory's tool
    results; checks the hash."""
    held = {im.sha256: im for im in g.images if im.data}
    for inv in t.tool_calls:
        held.update((im.sha256, im) for im in inv.result.images if im.data and im.sha256)

    def get(sha: str) -> bytes:
        image: Image | None = held.get(sha)
        if image is None:
            raise ValueError(
                f"group {g.group_id}: trajectory {t.trajectory_id}: image {sha[:12]} has no "
                "bytes in the group (the queue must attach every referenced image)"
            )
        if hashlib.sha256(image.data).hexdigest() != sha:
            raise ValueError(
                f"group {g.group_id}: trajectory {t.trajectory_id}: image {sha[:12]}: bytes do "
                "not match the hash"
            )
        return image.data

    return get


# --------------------------------------------------------------------------- rows


def rows_from_groups(
    groups: Sequence[Group],
    spec: AlgorithmSpec,
    *,
    scale_by_std: bool = True,
    std_floor: float = algorithm.DEFAULT_STD_FLOOR,
    images: ImageEncoder | None = None,
) -> list[Row]:
    """Validate each trajectory, compute advantages per group and the effective loss masks;
    expand image placeholders with ``images`` (required when a trajectory has images).

    Raises ValueError naming the group and trajectory on inconsistent input."""
    rows: list[Row] = []
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # by sha256, across groups
    for g in groups:
        if not g.trajectories:
            raise ValueError(f"group {g.group_id}: no trajectories")
        advantages = algorithm.group_advantages(
            g, grouping=spec.advantage_grouping, scale_by_std=scale_by_std, std_floor=std_floor
        )
        for t, adv in zip(g.trajectories, advantages, strict=True):
            t.validate()
            if not t.token_ids:
                raise ValueError(f"group {g.group_id}: trajectory {t.trajectory_id} is empty")
            row = Row(
                group_id=g.group_id,
                trajectory_id=t.trajectory_id,
                token_ids=t.token_ids,
                loss_mask=algorithm.loss_mask(t, mask_frozen_prefix=spec.mask_frozen_prefix),
                rollout_logprobs=t.logprobs,
                advantage=adv,
                policy_version=g.policy_version,
                processing=g.sampling,
            )
            if t.image_sha256:
                if images is None:
                    raise ValueError(
                        f"group {g.group_id}: trajectory {t.trajectory_id} references images "
                        "but the learner has no image processor"
                    )
                get = _image_bytes(g, t)
                for sha in t.image_sha256:
                    if sha not in encoded:
                        encoded[sha] = images.encode(get(sha))
                row = _with_images(row, [encoded[sha] for sha in t.image_sha256], images)
            elif images is not None and images.image_token_id in t.token_ids:
                raise ValueError(
                    f"group {g.group_id}: trajectory {t.trajectory_id}: image placeholders in "
                    "token_ids but no image_sha256"
                )
            rows.append(row)
    return rows


def _with_images(
    row: Row, encoded: Sequence[tuple[torch.Tensor, torch.Tensor]], images: ImageEncoder
) -> Row:
    grids = torch.cat([grid for _, grid in encoded])
    try:
        ids, where = expand_placeholders(
            row.token_ids, images.image_token_id, [images.tokens(g) for g in grids]
        )
    except ValueError as exc:
        raise ValueError(f"group {row.group_id}: trajectory {row.trajectory_id}: {exc}") from exc
    if any(row.loss_mask[i] for i, t in enumerate(row.token_ids) if t == images.image_token_id):
        raise ValueError(
            f"group {row.group_id}: trajectory {row.trajectory_id}: loss_mask covers an image "
            "placeholder"
        )
    n = len(ids)
    return dataclasses.replace(
        row,
        token_ids=ids,
        loss_mask=moved(row.loss_mask, where, n, False),
        rollout_logprobs=moved(row.rollout_logprobs, where, n, 0.0),
        pixel_values=torch.cat([pv for pv, _ in encoded]),
        image_grid_thw=grids,
    )


def pack(rows: Sequence[Row], token_budget: int) -> list[list[Row]]:
    """Greedy packing in order of decreasing length (stable): a micro-batch grows while
    ``len(rows) * longest`` stays within ``token_budget``. Lengths are expanded lengths."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    ordered = sorted(rows, key=lambda r: -len(r.token_ids))
    out: list[list[Row]] = []
    current: list[Row] = []
    longest = 0
    for r in ordered:
        n = len(r.token_ids)
        if current and (len(current) + 1) * max(longest, n) > token_budget:
            out.append(current)
            current, longest = [], 0
        current.append(r)
        longest = max(longest, n)
    if current:
        out.append(current)
    return out


def collate(rows: Sequence[Row], pad_id: int, image_token_id: int | None = None) -> MicroBatch:
    """Right-pad ``rows`` into tensors (float32 logprobs and advantages). Rows with images
    need ``image_token_id``; the advantage is 0 on image tokens."""
    width = max(len(r.token_ids) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    old = torch.zeros((n, width), dtype=torch.float32)
    adv = torch.zeros((n, width), dtype=torch.float32)
    for i, r in enumerate(rows):
        k = len(r.token_ids)
        ids[i, :k] = torch.tensor(r.token_ids, dtype=torch.long)
        attn[i, :k] = 1
        mask[i, :k] = torch.tensor(r.loss_mask, dtype=torch.bool)
        old[i, :k] = torch.tensor(r.rollout_logprobs, dtype=torch.float32)
        adv[i, :k] = r.advantage
    mb = MicroBatch(ids, attn, mask, old, adv, list(rows))
    pixels = [r.pixel_values for r in rows if r.pixel_values is not None]
    grids = [r.image_grid_thw for r in rows if r.image_grid_thw is not None]
    if pixels:
        if image_token_id is None:
            raise ValueError("collate: rows with images need image_token_id")
        image = (ids == image_token_id) & attn.bool()
        adv.masked_fill_(image, 0.0)
        mb.mm_token_type_ids = image.long()
        mb.pixel_values = torch.cat(pixels)
        mb.image_grid_thw = torch.cat(grids)
    return mb


def micro_batches(
    rows: Sequence[Row], token_budget: int, pad_id: int, image_token_id: int | None = None
) -> list[MicroBatch]:
    """:func:`pack` then :func:`collate`."""
    return [collate(chunk, pad_id, image_token_id) for chunk in pack(rows, token_budget)]
