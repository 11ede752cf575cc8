"""The loss mask and the clipped policy loss (torch, imported lazily).

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

from axpo.contracts.domain import Trajectory

if TYPE_CHECKING:
    import torch

Aggregation = Literal["token", "sequence", "dr_grpo"]


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
    is_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped policy-gradient loss over a padded batch.

    Tensors are ``[batch, time]``: ``logprobs`` (the learner's, with grad) and
    ``old_logprobs`` (behaviour policy, no grad) of the sampled tokens, ``advantages`` (per
    token; broadcast a per-sequence value), ``mask`` (bool or 0/1; padding is 0). Optional:
    ``ref_logprobs`` for the KL term (used when ``kl_coef > 0``), ``entropies`` of the learner
    for the metric, ``rollout_logprobs`` (the inference engine's) for the mismatch metrics,
    ``is_weights`` (per token, no grad) multiplying the policy-gradient term (truncated
    importance sampling).
    ``denominator`` overrides the aggregation's normalizer (see :func:`loss_denominator`);
    ``sequence`` aggregation then sums per-sequence means and divides by it.

    Metrics: ``pg_loss``, ``kl`` (k3 vs ref), ``clip_fraction`` (tokens whose clipped term is
    the active one), ``clip_low_fraction``/``clip_high_fraction``, ``approx_kl`` (k3 between
    behaviour and current policy), ``entropy``, ``logprob_mismatch_mean``/``_max`` (absolute
    learner-vs-rollout difference), ``is_weight`` (mean importance weight), ``tokens``.
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
    if is_weights is not None:
        if is_weights.shape != shape:
            raise ValueError(
                f"is_weights has shape {tuple(is_weights.shape)}, logprobs {tuple(shape)}"
            )
        per_token = per_token * is_weights.detach().to(per_token.dtype)
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
        if is_weights is not None:
            metrics["is_weight"] = masked_mean(is_weights.to(m.dtype))
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
