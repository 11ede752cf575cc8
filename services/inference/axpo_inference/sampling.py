"""Between our sampling types and vLLM's: the ``SamplingParams`` vLLM gets for a request, and
the :class:`Sample` (tokens, scores, finish reason) made from one of its outputs.

Vision tokens (image/video placeholders, vision start/end) are never sampled: a logit bias
of -100 keeps them out, because a placeholder the model writes has no image behind it and the
next turn's prompt (and the learner's batch) would be invalid.

Sample scores: the logprob of each sampled token under the sampling policy (vLLM's
``processed_logprobs`` by default: after temperature/top-k/top-p), the top-k alternatives, and an
entropy estimate from the top ``max(top_logprobs, entropy_top_logprobs)`` (see
:mod:`axpo_inference.entropy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from axpo.contracts.domain import (
    FinishReason,
    LogprobProcessing,
    Sample,
    SamplingParams,
    TokenScores,
)
from axpo_inference.entropy import topk_entropy

UNSAMPLED_LOGIT_BIAS = -100.0
"""Logit bias of the never-sampled (vision) tokens."""


def vllm_params(
    params: SamplingParams, entropy_top_logprobs: int, unsampled_token_ids: Sequence[int]
) -> Any:
    """vLLM's ``SamplingParams`` for ``params``: stop strings kept in the output, final output
    only, ``max(top_logprobs, entropy_top_logprobs)`` logprobs per token, and a -100 logit bias
    on ``unsampled_token_ids``. Raises vLLM's ValueError for parameters it refuses."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop_strings),
        include_stop_str_in_output=True,
        seed=params.seed,
        logprobs=max(params.top_logprobs, entropy_top_logprobs),
        output_kind=RequestOutputKind.FINAL_ONLY,
        skip_special_tokens=False,
        logit_bias=dict.fromkeys(unsampled_token_ids, UNSAMPLED_LOGIT_BIAS) or None,
    )


def processing(
    params: SamplingParams, unsampled_token_ids: Sequence[int], logprobs_mode: str
) -> LogprobProcessing:
    """How vLLM computes the reported logprobs of a request sampled with ``params`` by
    :func:`vllm_params`: the bias on ``unsampled_token_ids``, then temperature, top-k, top-p
    (``processed_logprobs``), or none of it (``raw_logprobs``)."""
    ids = tuple(sorted(int(t) for t in unsampled_token_ids))
    return LogprobProcessing.of(
        params,
        biased_token_ids=ids,
        logit_bias=UNSAMPLED_LOGIT_BIAS if ids else 0.0,
        processed=logprobs_mode == "processed_logprobs",
    )


def to_sample(
    out: Any,
    params: SamplingParams,
    version: int,
    entropy_top_logprobs: int,
    processing: LogprobProcessing | None = None,
) -> Sample:
    """The :class:`Sample` of one vLLM ``CompletionOutput``, stamped with ``version`` and the
    ``processing`` its logprobs went through: scores from its logprobs (entropy from the top
    ``entropy_top_logprobs``), the finish reason mapped to ours."""
    token_ids = tuple(int(t) for t in out.token_ids)
    k = params.top_logprobs
    logprobs: list[float] = []
    entropies: list[float] = []
    top_ids: list[int] = []
    top_lps: list[float] = []
    for pos, tok in enumerate(token_ids):
        entry = out.logprobs[pos] if out.logprobs is not None else {}
        ranked = sorted(
            ((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None),
            key=lambda r: (r[0], -r[2]),
        )
        sampled = entry.get(tok)
        logprobs.append(float(sampled.logprob) if sampled is not None else float("nan"))
        topn = [r for r in ranked if r[0] <= entropy_top_logprobs] or ranked
        entropies.append(topk_entropy([r[2] for r in topn]))
        if k:
            head = [r for r in ranked if r[0] <= k][:k]
            for _, tid, lp in head:
                top_ids.append(int(tid))
                top_lps.append(float(lp))
            for _ in range(k - len(head)):  # fewer candidates than k (tiny vocabularies)
                top_ids.append(-1)
                top_lps.append(float("-inf"))
    reason = FinishReason.LENGTH
    stop_string = ""
    if out.finish_reason == "stop":
        if isinstance(out.stop_reason, str):
            reason, stop_string = FinishReason.STOP_SEQUENCE, out.stop_reason
        elif isinstance(out.stop_reason, int) and out.stop_reason in params.stop_token_ids:
            reason = FinishReason.STOP_SEQUENCE
        else:
            reason = FinishReason.STOP
    elif out.finish_reason == "abort":
        reason = FinishReason.ABORT
    return Sample(
        token_ids=token_ids,
        scores=TokenScores(
            logprobs=tuple(logprobs),
            entropies=tuple(entropies),
            top_k=k,
            top_token_ids=tuple(top_ids),
            top_logprobs=tuple(top_lps),
        ),
        finish_reason=reason,
        policy_version=version,
        stop_string=stop_string,
        processing=processing,
    )
