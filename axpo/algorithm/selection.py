"""AXPO's selection: when a group needs resampling, which thinking prefixes are candidates,
how uncertain the policy was at each, which are kept, and how many resamples each gets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from axpo.contracts.domain import Segment, SegmentKind, Trajectory

Anchor = Literal["first", "any"]
Uncertainty = Literal["mean_entropy", "first_token_entropy", "neg_mean_logprob"]


@dataclass(frozen=True)
class PrefixCandidate:
    """A thinking prefix AXPO may freeze: ``token_ids[:prefix_length]`` of rollout
    ``trajectory_index`` (prompt plus everything the model wrote before the anchor tool call),
    and the policy's uncertainty at that call."""

    trajectory_index: int
    trajectory_id: str
    prefix_length: int
    call_end: int
    uncertainty: float


def is_original(traj: Trajectory) -> bool:
    return not traj.resampled_from


def needs_resampling(trajectories: Sequence[Trajectory]) -> bool:
    """AXPO's condition (docs/algorithm.md, "AXPO step by step", step 2): among the *original*
    rollouts, the tool-using subgroup (>= 1 tool call) is non-empty and none of it is correct.

    A rollout without a reward counts as wrong."""
    tool_users = [t for t in trajectories if is_original(t) and t.uses_tools]
    return bool(tool_users) and not any(
        t.reward is not None and t.reward.correct for t in tool_users
    )


def uncertainty_score(traj: Trajectory, start: int, end: int, score: Uncertainty) -> float:
    """The policy's uncertainty over the tool-call tokens ``[start, end)`` of ``traj``:
    ``mean_entropy`` (mean top-k entropy), ``first_token_entropy`` (entropy of the first
    tool-call token: the decision to call) or ``neg_mean_logprob`` (``-mean(logprob)``)."""
    if not 0 <= start < end <= len(traj.token_ids):
        raise ValueError(
            f"trajectory {traj.trajectory_id}: tool-call span [{start}, {end}) is empty or "
            f"outside its {len(traj.token_ids)} tokens"
        )
    if score == "mean_entropy":
        return math.fsum(traj.entropies[start:end]) / (end - start)
    if score == "first_token_entropy":
        return float(traj.entropies[start])
    if score == "neg_mean_logprob":
        return -math.fsum(traj.logprobs[start:end]) / (end - start)
    raise ValueError(f"unknown uncertainty score {score!r}")


def prefix_candidates(
    trajectories: Sequence[Trajectory],
    *,
    anchor: Anchor = "first",
    score: Uncertainty = "mean_entropy",
) -> list[PrefixCandidate]:
    """Candidate prefixes of the original tool-using rollouts, in rollout then position order.

    Each ``TOOL_CALL`` segment after the prompt that the model wrote (its first token is in
    the loss mask) anchors a candidate: the first one of each rollout with ``anchor="first"``,
    every one with ``"any"``. Empty when :func:`needs_resampling` is false."""
    if anchor not in ("first", "any"):
        raise ValueError(f"unknown tool-call anchor {anchor!r}")
    if not needs_resampling(trajectories):
        return []
    out: list[PrefixCandidate] = []
    for i, t in enumerate(trajectories):
        if not is_original(t) or not t.uses_tools:
            continue
        calls = _model_tool_calls(t)
        out += [_candidate(i, t, seg, score) for seg in (calls[:1] if anchor == "first" else calls)]
    return out


def _model_tool_calls(t: Trajectory) -> list[Segment]:
    """The ``TOOL_CALL`` segments after the prompt that the model wrote (first token trained)."""
    return [
        seg
        for seg in t.segments
        if seg.kind == SegmentKind.TOOL_CALL
        and seg.end > seg.start >= t.prompt_length
        and t.loss_mask[seg.start]
    ]


def _candidate(i: int, t: Trajectory, seg: Segment, score: Uncertainty) -> PrefixCandidate:
    return PrefixCandidate(
        i, t.trajectory_id, seg.start, seg.end, uncertainty_score(t, seg.start, seg.end, score)
    )


def speculative_prefixes(
    first_turns: Sequence[Trajectory],
    callers: Sequence[bool],
    *,
    score: Uncertainty = "mean_entropy",
    rho: float = 0.25,
) -> list[PrefixCandidate]:
    """The prefixes AXPO will keep (with ``anchor="first"``) *if* its condition turns out to
    hold, known as soon as the first assistant turn of every original rollout is sampled.

    ``first_turns[i]`` is original rollout ``i`` cut after its first assistant turn (no
    reward yet); ``callers[i]`` says that turn ended in a tool call the loop will run, i.e.
    rollout ``i`` will be a tool user. If the condition holds once the rollouts are scored,
    the tool users are exactly the callers, each one's first call is the one that turn wrote
    (same tokens, same entropies), so ``select_prefixes(prefix_candidates(...), rho)`` returns
    these very candidates, in this order. The rollout loop uses this to start resampling
    while the originals still run, and keeps the result only if the condition holds
    (docs/algorithm.md, "Speculative resampling": the algorithm is unchanged, what is sampled
    is the same, only earlier)."""
    if len(first_turns) != len(callers):
        raise ValueError(f"{len(first_turns)} first turns but {len(callers)} caller flags")
    out: list[PrefixCandidate] = []
    for i, (t, calls) in enumerate(zip(first_turns, callers, strict=True)):
        spans = _model_tool_calls(t) if calls and is_original(t) else []
        if spans:
            out.append(_candidate(i, t, spans[0], score))
    return select_prefixes(out, rho)


def select_prefixes(candidates: Sequence[PrefixCandidate], rho: float) -> list[PrefixCandidate]:
    """The ``max(1, floor(rho * n))`` most uncertain of ``n`` candidates, most uncertain first;
    ties keep candidate order (earlier rollout, then earlier call). Empty input -> empty."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if not candidates:
        return []
    keep = max(1, math.floor(rho * len(candidates) + 1e-9))
    ranked = sorted(range(len(candidates)), key=lambda j: (-candidates[j].uncertainty, j))
    return [candidates[j] for j in ranked[:keep]]


def resample_counts(kept: int, group_size: int, per_prefix: int | None = None) -> list[int]:
    """Resamples for each of ``kept`` selected prefixes (in selection order).

    With ``per_prefix`` (K) set: ``[K] * kept``. Unset: the budget ``group_size // 2`` spread
    as evenly as possible, the most uncertain prefixes taking the remainder, and at least one
    each (so the total exceeds the budget only when ``kept > group_size // 2``).

    >>> resample_counts(3, 8)
    [2, 1, 1]
    >>> resample_counts(1, 8)
    [4]
    """
    if kept < 0 or group_size < 1:
        raise ValueError(f"kept must be >= 0 and group_size >= 1, got {kept}, {group_size}")
    if per_prefix is not None:
        if per_prefix < 1:
            raise ValueError(f"resamples_per_prefix must be >= 1, got {per_prefix}")
        return [per_prefix] * kept
    if kept == 0:
        return []
    budget = max(group_size // 2, kept)
    base, extra = divmod(budget, kept)
    return [base + (1 if j < extra else 0) for j in range(kept)]
