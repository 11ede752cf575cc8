"""The RL algorithm's pure functions: advantages, AXPO grouping, loss masks, the policy loss.

No I/O and no model: plain Python for advantages and masks, torch tensors for the loss (torch
is imported lazily, so importing this module keeps the core light).

Definitions (DESIGN.md section 1; the paper leaves these open, so they are fixed here):

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

**Loss mask.** A token carries gradient when ``Trajectory.loss_mask`` says so (model-written
tokens only) and, for a resampled rollout with ``mask_frozen_prefix``, its position is at or
after ``frozen_prefix_length`` (the frozen tokens were already trained in the original).

**Policy loss** per token ``t``: ``ratio = exp(logp - old_logp)``,
``l_t = max(-A*ratio, -A*clip(ratio, 1 - clip_low, 1 + clip_high))`` (DAPO clip-higher when
``clip_high > clip_low``), plus ``kl_coef * k3`` where
``k3 = exp(ref - logp) - (ref - logp) - 1 >= 0``. Aggregation over the masked tokens ``M``:

- ``token`` (DAPO): ``sum_{i,t in M} l / |M|`` — every token weighs the same.
- ``sequence`` (GRPO): ``mean_i (sum_{t in M_i} l / |M_i|)`` over sequences with ``|M_i| > 0``.
- ``dr_grpo``: ``sum_{i,t in M} l / (n_seq * L)`` with a constant ``L`` (the generation
  budget, default the padded length) — no length bias.

Under gradient accumulation the denominators must be those of the whole optimizer step, not
of a micro-batch: compute them once with :func:`loss_denominator` and pass them in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from axpo.domain import Group, Segment, SegmentKind, Trajectory

if TYPE_CHECKING:
    import torch

Grouping = Literal["union", "per_prefix"]
Aggregation = Literal["token", "sequence", "dr_grpo"]

DEFAULT_STD_FLOOR = 1e-6


# --------------------------------------------------------------------------- advantages


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


# --------------------------------------------------------------------------- masks


def loss_mask(traj: Trajectory, *, mask_frozen_prefix: bool = True) -> tuple[bool, ...]:
    """Which tokens of ``traj`` carry gradient: its ``loss_mask``, minus the frozen prefix of a
    resampled rollout when ``mask_frozen_prefix``."""
    mask = traj.loss_mask
    if len(mask) != len(traj.token_ids):
        raise ValueError(
            f"trajectory {traj.trajectory_id}: loss_mask has {len(mask)} entries, "
            f"token_ids has {len(traj.token_ids)}"
        )
    if mask_frozen_prefix and traj.resampled_from and traj.frozen_prefix_length > 0:
        k = min(traj.frozen_prefix_length, len(mask))
        return (False,) * k + tuple(mask[k:])
    return tuple(mask)


# --------------------------------------------------------------------------- AXPO selection

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
    """AXPO's condition (DESIGN.md section 1, step 2): among the *original* rollouts, the
    tool-using subgroup (>= 1 tool call) is non-empty and none of it is correct.

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
    (DESIGN.md section 1 unchanged: what is sampled is the same, only earlier)."""
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


# --------------------------------------------------------------------------- loss


@dataclass
class LossOutput:
    """The scalar loss to backpropagate and detached float metrics (masked means)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def loss_denominator(
    aggregation: Aggregation, masks: Sequence[Sequence[bool]], *, norm_length: int | None = None
) -> float:
    """The denominator of ``aggregation`` over all sequences of an optimizer step (``masks``:
    each sequence's loss mask). ``token``: masked tokens; ``sequence``: sequences with at least
    one masked token; ``dr_grpo``: ``n_seq * norm_length`` (default: the longest sequence)."""
    if aggregation == "token":
        return float(sum(sum(1 for m in mask if m) for mask in masks))
    if aggregation == "sequence":
        return float(sum(1 for mask in masks if any(mask)))
    if aggregation == "dr_grpo":
        length = norm_length if norm_length is not None else max((len(m) for m in masks), default=0)
        return float(len(masks) * length)
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): ``exp(d) - d - 1`` with ``d = ref - logp``;
    ``>= 0``, and 0 where the two agree."""
    d = ref_logprobs - logprobs
    return d.exp() - d - 1


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token",
    denominator: float | None = None,
    norm_length: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropies: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped policy-gradient loss over a padded batch.

    Tensors are ``[batch, time]``: ``logprobs`` (the learner's, with grad) and
    ``old_logprobs`` (behaviour policy, no grad) of the sampled tokens, ``advantages`` (per
    token; broadcast a per-sequence value), ``mask`` (bool or 0/1; padding is 0). Optional:
    ``ref_logprobs`` for the KL term (used when ``kl_coef > 0``), ``entropies`` of the learner
    for the metric, ``rollout_logprobs`` (the inference engine's) for the mismatch metrics.
    ``denominator`` overrides the aggregation's normalizer (see :func:`loss_denominator`);
    ``sequence`` aggregation then sums per-sequence means and divides by it.

    Metrics: ``pg_loss``, ``kl`` (k3 vs ref), ``clip_fraction`` (tokens whose clipped term is
    the active one), ``clip_low_fraction``/``clip_high_fraction``, ``approx_kl`` (k3 between
    behaviour and current policy), ``entropy``, ``logprob_mismatch_mean``/``_max`` (absolute
    learner-vs-rollout difference), ``tokens``.
    """
    import torch

    if not (0 <= clip_low < 1) or clip_high < 0:
        raise ValueError(
            f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low}, {clip_high}"
        )
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs {tuple(shape)}")
    m = mask.to(logprobs.dtype)
    n_tokens = m.sum()

    log_ratio = logprobs - old_logprobs.detach()
    ratio = log_ratio.exp()
    adv = advantages.detach().to(logprobs.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    pg_per_token = per_token
    kl_tok: torch.Tensor | None = None
    if ref_logprobs is not None and kl_coef > 0:
        kl_tok = k3_kl(logprobs, ref_logprobs.detach())
        per_token = per_token + kl_coef * kl_tok

    def aggregate(values: torch.Tensor) -> torch.Tensor:
        if aggregation == "token":
            denom = denominator if denominator is not None else n_tokens.clamp(min=1)
            return (values * m).sum() / denom
        if aggregation == "sequence":
            lengths = m.sum(dim=-1)
            seq_mean = (values * m).sum(dim=-1) / lengths.clamp(min=1)
            if denominator is not None:
                return seq_mean.sum() / denominator
            return seq_mean.sum() / (lengths > 0).sum().clamp(min=1)
        if aggregation == "dr_grpo":
            if denominator is not None:
                return (values * m).sum() / denominator
            length = norm_length if norm_length is not None else shape[-1]
            return (values * m).sum() / max(shape[0] * length, 1)
        raise ValueError(f"unknown loss aggregation {aggregation!r}")

    loss = aggregate(per_token)

    with torch.no_grad():
        count = max(float(n_tokens.item()), 1.0)

        def masked_mean(x: torch.Tensor) -> float:
            return float((x * m).sum().item()) / count

        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        metrics: dict[str, float] = {
            "loss": float(loss.item()),
            "pg_loss": float(aggregate(pg_per_token).item()),
            "clip_fraction": masked_mean((low | high).to(m.dtype)),
            "clip_low_fraction": masked_mean(low.to(m.dtype)),
            "clip_high_fraction": masked_mean(high.to(m.dtype)),
            "approx_kl": masked_mean(k3_kl(logprobs.detach(), old_logprobs.detach())),
            "tokens": float(n_tokens.item()),
        }
        if kl_tok is not None:
            metrics["kl"] = masked_mean(kl_tok)
        if entropies is not None:
            metrics["entropy"] = masked_mean(entropies)
        if rollout_logprobs is not None:
            diff = (logprobs.detach() - rollout_logprobs).abs() * m
            metrics["logprob_mismatch_mean"] = float(diff.sum().item()) / count
            metrics["logprob_mismatch_max"] = float(diff.max().item()) if diff.numel() else 0.0
    return LossOutput(loss=loss, metrics=metrics)


def mean_metrics(
    parts: Sequence[Mapping[str, float]], weights: Sequence[float]
) -> dict[str, float]:
    """Weighted mean of metric dicts (e.g. micro-batches weighted by their token counts);
    keys ending in ``_max`` take the max, ``tokens`` and ``loss``/``pg_loss`` are summed (they
    are already normalized by the step's denominator)."""
    out: dict[str, float] = {}
    total = sum(weights) or 1.0
    keys = {k for p in parts for k in p}
    for k in sorted(keys):
        vals = [(p[k], w) for p, w in zip(parts, weights, strict=True) if k in p]
        if k.endswith("_max"):
            out[k] = max(v for v, _ in vals)
        elif k in ("tokens", "loss", "pg_loss"):
            out[k] = math.fsum(v for v, _ in vals)
        else:
            out[k] = math.fsum(v * w for v, w in vals) / total
    return out
