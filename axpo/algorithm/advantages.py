"""Group-normalized advantages, and how AXPO's resamples are grouped for them.

**Group-normalized advantage.** For the rewards ``r_1..r_n`` of one advantage set,
``A_i = (r_i - mean(r)) / max(std(r), std_floor)`` with the population std (``ddof=0``).
With ``scale_by_std=False`` (Dr.GRPO) ``A_i = r_i - mean(r)``. A set whose rewards are all
equal gets all-zero advantages; a set of one rollout gets 0.

**AXPO grouping** (``advantage_grouping``). A group holds *original* rollouts
(``resampled_from == ""``) and *resampled* ones (``resampled_from`` = id of the original whose
thinking prefix was frozen and resumed).

- ``union``: one advantage set, all rollouts (originals and resamples) together.
- ``per_prefix``: the originals form one set (plain GRPO among them; their advantages ignore
  the resamples). For every original ``o`` with resamples, the *prefix set* is ``{o}`` plus
  every rollout resampled from ``o``; each resample takes its advantage from its prefix set.
  ``o`` belongs to it because its own continuation is one more sample from the same frozen
  prefix (so a correct resample of an all-wrong prefix gets a positive advantage), but ``o``'s
  advantage still comes from the originals' set. A resample whose ``resampled_from`` names no
  rollout of the group forms a prefix set with its siblings only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from axpo.contracts.domain import Group, Trajectory

Grouping = Literal["union", "per_prefix"]

DEFAULT_STD_FLOOR = 1e-6


def normalized_advantages(
    rewards: Sequence[float], *, scale_by_std: bool = True, std_floor: float = DEFAULT_STD_FLOOR
) -> list[float]:
    """``(r - mean) / max(std, std_floor)`` (population std), or ``r - mean`` without scaling.

    >>> normalized_advantages([1.0, 0.0])
    [1.0, -1.0]
    >>> normalized_advantages([0.5, 0.5, 0.5])
    [0.0, 0.0, 0.0]
    """
    if std_floor <= 0:
        raise ValueError(f"std_floor must be > 0, got {std_floor}")
    n = len(rewards)
    if n == 0:
        return []
    mean = math.fsum(rewards) / n
    centred = [r - mean for r in rewards]
    # Exactly equal rewards give exact zeros (no floating residue divided by the floor).
    if all(r == rewards[0] for r in rewards):
        return [0.0] * n
    if not scale_by_std:
        return centred
    std = math.sqrt(math.fsum(c * c for c in centred) / n)
    denom = max(std, std_floor)
    return [c / denom for c in centred]


def trajectory_rewards(group: Group) -> list[float]:
    """Each rollout's ``reward.total``; ValueError naming the first rollout without a reward."""
    out = []
    for t in group.trajectories:
        if t.reward is None:
            raise ValueError(f"group {group.group_id}: trajectory {t.trajectory_id} has no reward")
        if not math.isfinite(t.reward.total):
            raise ValueError(
                f"group {group.group_id}: trajectory {t.trajectory_id} reward "
                f"{t.reward.total} is not finite"
            )
        out.append(t.reward.total)
    return out


@dataclass(frozen=True)
class AdvantageSet:
    """Indices (into ``group.trajectories``) normalized together, and which of them take their
    advantage from this set (``assign``; the others only contribute to its statistics)."""

    members: tuple[int, ...]
    assign: tuple[int, ...]


def advantage_sets(trajectories: Sequence[Trajectory], grouping: Grouping) -> list[AdvantageSet]:
    """The advantage sets of one group under ``grouping`` (module docstring). Every rollout is
    assigned by exactly one set."""
    n = len(trajectories)
    if grouping == "union":
        everyone = tuple(range(n))
        return [AdvantageSet(everyone, everyone)]
    if grouping != "per_prefix":
        raise ValueError(f"unknown advantage grouping {grouping!r}")
    originals = tuple(i for i, t in enumerate(trajectories) if not t.resampled_from)
    index_of = {trajectories[i].trajectory_id: i for i in originals}
    by_parent: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        if t.resampled_from:
            by_parent.setdefault(t.resampled_from, []).append(i)
    sets = [AdvantageSet(originals, originals)] if originals else []
    for parent, children in by_parent.items():
        members = ([index_of[parent]] if parent in index_of else []) + children
        sets.append(AdvantageSet(tuple(members), tuple(children)))
    return sets


def group_advantages(
    group: Group,
    *,
    grouping: Grouping = "union",
    scale_by_std: bool = True,
    std_floor: float = DEFAULT_STD_FLOOR,
) -> list[float]:
    """One advantage per rollout of ``group`` (same order), per the module docstring."""
    rewards = trajectory_rewards(group)
    out: list[float | None] = [None] * len(rewards)
    for s in advantage_sets(group.trajectories, grouping):
        adv = normalized_advantages(
            [rewards[i] for i in s.members], scale_by_std=scale_by_std, std_floor=std_floor
        )
        by_index = dict(zip(s.members, adv, strict=True))
        for i in s.assign:
            out[i] = by_index[i]
    missing = [i for i, a in enumerate(out) if a is None]
    if missing:  # pragma: no cover - advantage_sets assigns every index
        raise AssertionError(f"rollouts {missing} got no advantage")
    return [a for a in out if a is not None]
