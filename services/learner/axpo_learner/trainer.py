"""The policy update: learner logprobs of the sampled tokens, the clipped loss, AdamW.

One :meth:`Trainer.train_step` is one optimizer step over a list of groups: advantages and
masks from :mod:`axpo.algorithm`, micro-batches by token budget with gradient accumulation
(the loss denominators are the whole step's, so the result does not depend on the budget),
global gradient-norm clipping, AdamW. Every forward runs before the optimizer step, so the
learner's logprobs are those of the pre-update policy; their mismatch with the rollout's
logprobs is logged (``logprob_mismatch_mean``/``_max``: how stale weights show up), and on the
groups sampled by the very weights the learner holds (no lag) as ``mismatch_fresh_mean``/
``_max``/``_k3`` over ``mismatch_fresh_tokens`` tokens (:class:`FreshMismatch`): what the
inference engine and the learner disagree on when the weights are the same.
Under torchrun the model is sharded with FSDP2 and each rank trains on its share of the
micro-batches (:mod:`axpo_learner.distributed`); every rank must get the same groups.
Trajectories with images are expanded and carry their pixels (:mod:`axpo_learner.batch`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from axpo import algorithm
from axpo.contracts.domain import Group
from axpo.settings.job import AlgorithmSpec
from axpo.settings.learner import LearnerSettings
from axpo_learner import distributed
from axpo_learner.batch import ImageEncoder, micro_batches, rows_from_groups
from axpo_learner.logprobs import token_logprobs

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch here
        return
    np.random.seed(seed % 2**32)


def load_policy(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """The model (train mode) and its processor from a checkpoint directory or hub name, its
    parameters in ``dtype`` (float32 for ``bf16-mixed``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=_DTYPES.get(dtype, torch.float32)
    )
    model.train()
    processor = AutoProcessor.from_pretrained(str(path))  # type: ignore[no-untyped-call]
    return model, processor


class FreshMismatch:
    """Inference-learner mismatch on the trained tokens of groups sampled by the policy the
    learner holds now (no lag): sums over micro-batches, then :meth:`metrics`. For a token,
    ``d = logprob_learner - logprob_rollout``; ``|d|`` (mean and max) and the k3 estimate of
    KL(rollout || learner), ``exp(d) - 1 - d`` (mean; >= 0, 0 only when they agree)."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.k3_sum = 0.0

    def add(self, learner: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> None:
        n = int(mask.sum().item())
        if n == 0:
            return
        learner, rollout = learner[mask].double(), rollout[mask].double()
        d = (learner - rollout).abs()
        self.tokens += n
        self.abs_sum += float(d.sum().item())
        self.abs_max = max(self.abs_max, float(d.max().item()))
        self.k3_sum += float(algorithm.k3_kl(rollout, learner).sum().item())

    def merge(self, other: FreshMismatch) -> None:
        self.tokens += other.tokens
        self.abs_sum += other.abs_sum
        self.abs_max = max(self.abs_max, other.abs_max)
        self.k3_sum += other.k3_sum

    def metrics(self) -> dict[str, float]:
        out = {"mismatch_fresh_tokens": self.tokens}
        if self.tokens:
            out.update(
                mismatch_fresh_mean=self.abs_sum / self.tokens,
                mismatch_fresh_max=self.abs_max,
                mismatch_fresh_k3=self.k3_sum / self.tokens,
            )
        return out


class Trainer:
    """Holds the policy, optimizer and scheduler; ``step`` counts optimizer steps and
    ``policy_version`` the weights published (it equals ``step`` unless set otherwise)."""

    def __init__(self, settings: LearnerSettings, spec: AlgorithmSpec | None = None) -> None:
        if not settings.model:
            raise ValueError("model: no checkpoint given")
        self.settings = settings
        self.spec = spec or AlgorithmSpec()
        self.world = distributed.init_from_env(settings.device)
        seed_everything(settings.seed)
        self.model, self.processor = load_policy(settings.model, settings.dtype)
        if settings.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.reference = None
        if settings.kl_coef > 0:  # copied on the host, before the policy moves
            self.reference = copy.deepcopy(self.model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
            distributed.place_reference(
                self.reference,
                self.world,
                settings.reference_placement,
                mixed_bf16=settings.dtype == "bf16-mixed",
            )
        self.model.to(self.world.device)
        mixed = settings.dtype == "bf16-mixed"
        if self.world.distributed:
            distributed.shard_model(self.model, mixed_bf16=mixed)
        # bf16-mixed in one process: autocast around every forward (FSDP2 casts by itself).
        self._autocast = mixed and not self.world.distributed
        self.publish_dtype = torch.bfloat16 if mixed else None
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=settings.lr,
            betas=settings.betas,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
        )
        warmup = settings.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.image_encoder = ImageEncoder.from_processor(self.processor)
        self.step = 0
        self.policy_version = 0

    def train_step(self, groups: Sequence[Group]) -> dict[str, float]:
        """One optimizer step on ``groups``; returns the step's metrics."""
        s = self.settings
        started = time.perf_counter()
        rows = rows_from_groups(
            groups,
            self.spec,
            scale_by_std=s.scale_advantages_by_std,
            std_floor=s.advantage_std_floor,
            images=self.image_encoder,
        )
        enc = self.image_encoder
        image_token = enc.image_token_id if enc is not None else None
        batches = micro_batches(rows, s.micro_batch_tokens, self.pad_id, image_token)
        # Token t is predicted at t-1: the loss covers positions 1.. of every row.
        masks = [list(r.loss_mask[1:]) for r in rows]
        norm = s.dr_grpo_length
        denom = algorithm.loss_denominator(s.loss_aggregation, masks, norm_length=norm)
        if s.loss_aggregation == "dr_grpo" and norm is None:
            # The longest row of the step, in shifted positions, for every micro-batch.
            norm = max(len(m) for m in masks)
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[dict[str, float]] = []
        scale = distributed.grad_scale(self.world)
        weights: list[float] = []
        fresh = FreshMismatch()
        for host_mb, live in distributed.share(batches, self.world):
            mb = host_mb.to(self.world.device)
            mask = mb.loss_mask[:, 1:]
            how = [r.processing for r in mb.rows]
            chunk = s.logprob_chunk_tokens
            with self.compute():
                logp, entropy = token_logprobs(
                    self.model, mb, how, chunk_tokens=chunk, positions=mask
                )
            rollout = mb.rollout_logprobs[:, 1:]
            if live:
                no_lag = [r.policy_version == self.policy_version for r in mb.rows]
                fresh_rows = torch.tensor(no_lag, dtype=torch.bool, device=mask.device)
                fresh.add(logp.detach(), rollout, mask & fresh_rows[:, None])
            old = rollout if s.behavior_logprobs == "rollout" else logp.detach()
            weights_is = None
            if s.tis_cap is not None:
                # pi_old / pi_rollout, truncated; 1 when the ratio is already against the engine.
                weights_is = (old - rollout).exp().clamp(max=s.tis_cap) * mask
            ref = None
            if self.reference is not None:
                with torch.no_grad(), self.compute():
                    ref, _ = token_logprobs(
                        self.reference, mb, how, chunk_tokens=chunk, positions=mask
                    )
                if self.world.distributed:
                    # FSDP2 leaves the root's parameters gathered after a forward, for the
                    # backward that would reshard them; the reference has no backward.
                    self.reference.reshard()
            out = algorithm.policy_loss(
                logp,
                old,
                mb.advantages[:, 1:],
                mask,
                clip_low=s.clip_low,
                clip_high=s.clip_high,
                aggregation=s.loss_aggregation,
                denominator=max(denom, 1.0),
                norm_length=norm,
                ref_logprobs=ref,
                kl_coef=s.kl_coef,
                entropies=entropy,
                rollout_logprobs=rollout,
                is_weights=weights_is,
            )
            if not live:  # padding pass: same collectives as the other ranks, no gradient
                (out.loss * 0.0).backward()  # type: ignore[no-untyped-call]
                continue
            (out.loss * scale).backward()  # type: ignore[no-untyped-call]
            parts.append(out.metrics)
            weights.append(out.metrics["tokens"])
        if self.world.distributed:
            gathered = distributed.gather_object((parts, weights, fresh), self.world)
            parts = [m for p, _, _ in gathered for m in p]
            weights = [w for _, ws, _ in gathered for w in ws]
            fresh = FreshMismatch()
            for _, _, f in gathered:
                fresh.merge(f)
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = algorithm.mean_metrics(parts, weights)
        metrics.update(fresh.metrics())
        metrics.update(
            grad_norm=grad_norm,
            lr=float(self.scheduler.get_last_lr()[0]),
            groups=float(len(groups)),
            sequences=float(len(rows)),
            images=float(sum(len(r.image_grid_thw) for r in rows if r.image_grid_thw is not None)),
            micro_batches=float(len(batches)),
            padded_tokens=float(sum(mb.padded_tokens for mb in batches)),
            step_s=time.perf_counter() - started,
        )
        if self.world.rank == 0:
            log.info(
                "step %d: loss %.4g, mismatch %.3g, clip %.3g",
                self.step,
                metrics.get("loss", 0.0),
                metrics.get("logprob_mismatch_mean", 0.0),
                metrics.get("clip_fraction", 0.0),
            )
        return metrics

    def compute(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward runs in: bfloat16 autocast for ``bf16-mixed`` in one
        process, else nothing."""
        if self._autocast:
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's tensors under ``state_dict`` names, for publication, in
        ``publish_dtype`` when set. Under FSDP2 the shards are gathered to rank 0's host memory
        (a collective: call it on every rank) and other ranks get None; in one process it is
        the model's own state dict (no copy), or host copies cast one tensor at a time."""
        if not self.world.distributed:
            state = dict(self.model.state_dict())
            if self.publish_dtype is None:
                return state
            return {k: self._published(v.detach().to("cpu")) for k, v in state.items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.world.rank != 0:
            return None
        return {k: self._published(v) for k, v in state.items() if isinstance(v, torch.Tensor)}

    def _published(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in ``publish_dtype`` when set and ``t`` is floating point (buffers of integer
        type keep theirs)."""
        if self.publish_dtype is None or not t.is_floating_point():
            return t
        return t.to(self.publish_dtype)

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        return distributed.full_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
