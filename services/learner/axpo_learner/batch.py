"""Micro-batches from groups: token ids, loss mask, rollout logprobs and per-token advantages.

Advantages and loss masks come from :mod:`axpo.algorithm`. Rows are packed into micro-batches
whose padded size (rows x longest row) stays within a token budget; a row longer than the
budget gets a micro-batch of its own. Text-only for now: a trajectory that references images
is refused (ValueError) until the processor path is wired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from axpo import algorithm
from axpo.config import AlgorithmSpec
from axpo.domain import Group


@dataclass(frozen=True)
class Row:
    """One trajectory, ready to train on."""

    group_id: str
    trajectory_id: str
    token_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    rollout_logprobs: tuple[float, ...]
    advantage: float


@dataclass
class MicroBatch:
    """Right-padded ``[rows, time]`` tensors. ``loss_mask`` is 0 on padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    rows: list[Row]

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())


def rows_from_groups(
    groups: Sequence[Group],
    spec: AlgorithmSpec,
    *,
    scale_by_std: bool = True,
    std_floor: float = algorithm.DEFAULT_STD_FLOOR,
) -> list[Row]:
    """Validate each trajectory, compute advantages per group and the effective loss masks.

    Raises ValueError naming the group and trajectory on inconsistent input."""
    rows: list[Row] = []
    for g in groups:
        if not g.trajectories:
            raise ValueError(f"group {g.group_id}: no trajectories")
        advantages = algorithm.group_advantages(
            g, grouping=spec.advantage_grouping, scale_by_std=scale_by_std, std_floor=std_floor
        )
        for t, adv in zip(g.trajectories, advantages, strict=True):
            t.validate()
            if t.image_sha256:
                raise ValueError(
                    f"group {g.group_id}: trajectory {t.trajectory_id} references images; "
                    "the learner's image path is not implemented yet"
                )
            if not t.token_ids:
                raise ValueError(f"group {g.group_id}: trajectory {t.trajectory_id} is empty")
            rows.append(
                Row(
                    group_id=g.group_id,
                    trajectory_id=t.trajectory_id,
                    token_ids=t.token_ids,
                    loss_mask=algorithm.loss_mask(t, mask_frozen_prefix=spec.mask_frozen_prefix),
                    rollout_logprobs=t.logprobs,
                    advantage=adv,
                )
            )
    return rows


def pack(rows: Sequence[Row], token_budget: int) -> list[list[Row]]:
    """Greedy packing in order of decreasing length (stable): a micro-batch grows while
    ``len(rows) * longest`` stays within ``token_budget``."""
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


def collate(rows: Sequence[Row], pad_id: int) -> MicroBatch:
    """Right-pad ``rows`` into tensors (float32 logprobs and advantages)."""
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
    return MicroBatch(ids, attn, mask, old, adv, list(rows))


def micro_batches(rows: Sequence[Row], token_budget: int, pad_id: int) -> list[MicroBatch]:
    """:func:`pack` then :func:`collate`."""
    return [collate(chunk, pad_id) for chunk in pack(rows, token_budget)]
