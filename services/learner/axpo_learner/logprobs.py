"""The learner's logprobs of the sampled tokens, computed the way the inference engine did.

**Same processing as the sampler.** The engine reports each sampled token's logprob under the
distribution it sampled from (vLLM's ``processed_logprobs``): a logit bias on never-sampled
tokens, logits divided by the temperature, then top-k and top-p filtering. Every group carries
that processing (:class:`~axpo.contracts.domain.LogprobProcessing`, reported by the engine),
and :func:`processed_logprobs` applies it to the learner's logits, so the policy ratio
``pi_learner / pi_rollout`` compares like with like. Filtering follows vLLM's
``apply_top_k_top_p`` as its PyTorch implementation (the CPU's) computes it: keep the tokens
whose logit is at least the k-th largest (ties kept); then, sorted by probability, drop the
least likely tokens while the dropped mass is at most ``1 - top_p`` (the most likely token
always stays). The filter mask carries no gradient. vLLM's Triton filter (CUDA) keeps exactly
k tokens when the k-th logit ties; the learner keeps them all, a difference the per-step
mismatch metrics show. One deliberate difference: the sampled token is always kept, so a token
outside the learner's filter (its logits differ a little from the engine's: kernels, dtype,
policy lag) gets a finite logprob and a bounded ratio instead of ``-inf``.

Only the model's output head is replaced: a model that transforms the logits after its head
(soft-capping, a logit scale) is refused on the lean path (:func:`check_lean_head`).

**Two paths, equal results** (tested to 1e-5 on the tiny model):

- ``chunk_tokens == 0`` — the reference: the model's float32 logits at every position, then
  the processing over the whole ``[rows, time, vocab]`` tensor (several such tensors live at
  once: with Qwen's 151 k vocabulary, ~5 GB each for one 8 k-token sequence).
- ``chunk_tokens > 0`` — memory-lean: while the model runs, its output head
  (``get_output_embeddings()``) computes, instead of the logits, the logprob and entropy of
  each trained position's target, ``chunk_tokens`` positions at a time, each chunk under
  activation checkpointing (its float32 logits are recomputed in the backward pass, never
  stored). Peak extra memory is a few float32 ``[chunk, vocab]`` temporaries of one chunk
  (logits, their filtered and normalised copies; top-p adds a sort). The head is swapped for
  the duration of one forward call only (:func:`_sampled_head`), inside the model's own
  forward, so FSDP2 gathers and reduces the head's (possibly tied) weight as usual, and
  parameter names never change.

Only the positions in ``positions`` (the loss mask) are computed; others read 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from axpo.contracts.domain import LogprobProcessing
from axpo_learner.batch import MicroBatch

PLAIN = LogprobProcessing()
"""Temperature 1, no filter, no bias: the model's own distribution."""


def filter_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean ``[n, vocab]``: tokens kept by top-k then top-p on ``logits`` (already biased
    and divided by the temperature), as vLLM's ``apply_top_k_top_p`` keeps them."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        keep = logits >= kth
    if top_p < 1.0:
        masked = logits.masked_fill(~keep, float("-inf"))
        ascending, order = masked.sort(dim=-1)
        mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = mass <= 1.0 - top_p
        drop[..., -1] = False  # the most likely token always stays
        keep = keep & ~drop.scatter(-1, order, drop)
    return keep


def processed_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, how: LogprobProcessing
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs ``[n]`` of ``targets`` under ``logits`` ``[n, vocab]`` processed as ``how``
    says, and the entropies ``[n]`` of the processed distributions (no gradient). Computed in
    float32 with a stable log-sum-exp."""
    z = logits.float()
    if how.processed:
        if how.biased_token_ids and how.logit_bias:
            ids = torch.tensor(how.biased_token_ids, device=z.device)
            ids = ids[ids < z.shape[-1]]
            bias = torch.zeros(z.shape[-1], device=z.device, dtype=z.dtype)
            bias[ids] = how.logit_bias
            z = z + bias
        if how.temperature != 1.0:
            z = z / how.temperature
        if how.top_k or how.top_p < 1.0:
            with torch.no_grad():
                keep = filter_mask(z.detach(), how.top_k, how.top_p)
                keep.scatter_(-1, targets.unsqueeze(-1), True)
            z = z.masked_fill(~keep, float("-inf"))
    log_norm = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    with torch.no_grad():
        lp = z.detach() - log_norm.detach().unsqueeze(-1)
        plogp = torch.where(torch.isfinite(lp), lp.exp() * lp, torch.zeros_like(lp))
        entropy = -plogp.sum(-1)
    return logp, entropy


def _partition(
    rows: int, processing: Sequence[LogprobProcessing] | LogprobProcessing
) -> list[tuple[LogprobProcessing, list[int]]]:
    """Rows grouped by their processing (in first-seen order)."""
    if isinstance(processing, LogprobProcessing):
        return [(processing, list(range(rows)))]
    if len(processing) != rows:
        raise ValueError(f"{len(processing)} processings for {rows} rows")
    out: dict[LogprobProcessing, list[int]] = {}
    for i, how in enumerate(processing):
        out.setdefault(how, []).append(i)
    return list(out.items())


def _select(rows: int, width: int, which: list[int], positions: torch.Tensor) -> torch.Tensor:
    """``positions`` restricted to the rows ``which``."""
    sel = torch.zeros(rows, dtype=torch.bool, device=positions.device)
    sel[which] = True
    return positions & sel[:, None]


def _from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor,
    parts: list[tuple[LogprobProcessing, list[int]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, width = targets.shape
    logp = torch.zeros((rows, width), dtype=torch.float32, device=logits.device)
    entropy = torch.zeros_like(logp)
    for how, which in parts:
        where = _select(rows, width, which, positions)
        lp, ent = processed_logprobs(logits[where], targets[where], how)
        logp = logp.masked_scatter(where, lp)
        entropy = entropy.masked_scatter(where, ent)
    return logp, entropy


def _chunked(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    how: LogprobProcessing,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`processed_logprobs` of ``head(hidden)`` for ``hidden`` ``[n, d]``, a chunk of
    positions at a time under activation checkpointing."""

    def one(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return processed_logprobs(head(h), t, how)

    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start : start + chunk_tokens]
        t = targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(one, h, t, use_reentrant=False)
        else:
            lp, ent = one(h, t)
        logps.append(lp)
        entropies.append(ent)
    if not logps:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)


_POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_lean_head(config: Any) -> None:
    """Refuse a model whose forward changes the logits after its output head (the lean path
    replaces only the head, so it would miss the change)."""
    configs = [config, getattr(config, "text_config", None)]
    for cfg in (c for c in configs if c is not None):
        for key in _POST_HEAD_KEYS:
            value = getattr(cfg, key, None)
            if value not in (None, 0, 1, 1.0):
                raise ValueError(
                    f"logprob_chunk_tokens: the model's config sets {key}={value!r}, a change of "
                    "the logits after the output head the lean path does not apply; use "
                    "logprob_chunk_tokens: 0"
                )


@contextmanager
def _sampled_head(
    model: Any,
    targets: torch.Tensor,
    positions: torch.Tensor,
    parts: list[tuple[LogprobProcessing, list[int]]],
    chunk_tokens: int,
    out: dict[str, torch.Tensor],
) -> Iterator[None]:
    """While active, the model's output head returns, in place of logits, a small dummy, and
    leaves the sampled tokens' logprobs and entropies ``[rows, time-1]`` in ``out``."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output head (get_output_embeddings() is None)")
    original = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:2] != (targets.shape[0], targets.shape[1] + 1):
            raise ValueError(
                f"output head got hidden states {tuple(hidden.shape)}, expected "
                f"{(targets.shape[0], targets.shape[1] + 1)} (all positions)"
            )
        h = hidden[:, :-1]
        rows, width = targets.shape
        logp = torch.zeros((rows, width), dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp)
        for how, which in parts:
            where = _select(rows, width, which, positions)
            lp, ent = _chunked(original, h[where], targets[where], how, chunk_tokens)
            logp = logp.masked_scatter(where, lp)
            entropy = entropy.masked_scatter(where, ent)
        if torch.is_grad_enabled() and hidden.requires_grad and not logp.requires_grad:
            # Nothing trained in this micro-batch: still a (zero) gradient through the head, so
            # backward works and every rank reduces the same parameters under FSDP.
            logp = logp + original(hidden[:1, :1]).float().sum() * 0.0
        out["logp"], out["entropy"] = logp, entropy
        return logp[:, :1, None].clone()  # what the model's forward returns as "logits"

    own = vars(head).get("forward")  # an instance-level forward someone else set (hooks)
    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward  # the class's forward again
        else:
            head.forward = own


def token_logprobs(
    model: Any,
    batch: MicroBatch,
    processing: Sequence[LogprobProcessing] | LogprobProcessing = PLAIN,
    *,
    chunk_tokens: int = 0,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs and entropies ``[rows, time-1]`` of tokens ``1..`` of ``batch`` under ``model``
    (the token at t is predicted from the logits at t-1), each row's logits processed as its
    ``processing`` (one for all rows, or one per row). Only ``positions`` ``[rows, time-1]``
    (default: every non-padding position) are computed; the rest read 0. ``chunk_tokens``
    selects the path (module docstring): 0 the full logits, > 0 the lean chunked head."""
    targets = batch.input_ids[:, 1:]
    if positions is None:
        positions = batch.attention_mask[:, 1:].bool()
    positions = positions.to(torch.bool)
    parts = _partition(targets.shape[0], processing)
    if chunk_tokens <= 0:
        logits = model(**batch.model_inputs(), use_cache=False).logits[:, :-1]
        return _from_logits(logits, targets, positions, parts)
    check_lean_head(model.config)
    out: dict[str, torch.Tensor] = {}
    with _sampled_head(model, targets, positions, parts, chunk_tokens, out):
        model(**batch.model_inputs(), use_cache=False)
    if "logp" not in out:
        raise RuntimeError("the model's forward did not call its output head")
    return out["logp"], out["entropy"]
