"""Converters between the wire types (``axpo.v1`` protobuf) and the domain types.

One ``*_to_proto`` / ``*_from_proto`` pair per type; round-trip tests in
tests/unit/test_convert.py keep each pair honest. ``*_from_proto`` raises ValueError naming the
field when a message cannot be represented (an unspecified enum, a malformed loss mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from axpo.contracts import domain as d
from axpo.v1 import common_pb2 as pb
from axpo.v1 import inference_pb2 as inference_pb
from axpo.v1 import tools_pb2 as tools_pb
from axpo.v1 import verifier_pb2 as verifier_pb

E = TypeVar("E", bound=StrEnum)

# Proto enum value <-> domain enum. The proto names are <PREFIX>_<DOMAIN VALUE UPPER>.
_ANSWER_KIND = {k: pb.AnswerKind.Value(f"ANSWER_KIND_{k.name}") for k in d.AnswerKind}
_FINISH_REASON = {k: pb.FinishReason.Value(f"FINISH_REASON_{k.name}") for k in d.FinishReason}
_TOOL_ERROR_KIND = {k: pb.ToolErrorKind.Value(f"TOOL_ERROR_KIND_{k.name}") for k in d.ToolErrorKind}
_SEGMENT_KIND = {k: pb.SegmentKind.Value(f"SEGMENT_KIND_{k.name}") for k in d.SegmentKind}


def _enum_from_proto(table: Mapping[E, int], value: int, field: str) -> E:
    for member, number in table.items():
        if number == value:
            return member
    raise ValueError(f"{field}: unspecified or unknown enum value {value}")


# --------------------------------------------------------------------------- enums


def answer_kind_to_proto(kind: d.AnswerKind) -> int:
    return _ANSWER_KIND[kind]


def answer_kind_from_proto(value: int, field: str = "kind") -> d.AnswerKind:
    return _enum_from_proto(_ANSWER_KIND, value, field)


# --------------------------------------------------------------------------- images


def image_to_proto(image: d.Image) -> pb.Image:
    return pb.Image(sha256=image.sha256, data=image.data, mime_type=image.mime_type)


def image_from_proto(msg: pb.Image) -> d.Image:
    return d.Image(sha256=msg.sha256, data=msg.data, mime_type=msg.mime_type)


# --------------------------------------------------------------------------- inference


def sampling_params_to_proto(params: d.SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        stop_token_ids=params.stop_token_ids,
        stop_strings=params.stop_strings,
        top_logprobs=params.top_logprobs,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def sampling_params_from_proto(msg: pb.SamplingParams) -> d.SamplingParams:
    return d.SamplingParams(
        n=msg.n,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p != 0 else 1.0,  # unset means off; negatives are refused later
        top_k=msg.top_k,
        max_tokens=msg.max_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop_strings=tuple(msg.stop_strings),
        seed=msg.seed if msg.HasField("seed") else None,
        top_logprobs=msg.top_logprobs,
    )


def token_scores_to_proto(scores: d.TokenScores) -> pb.TokenScores:
    return pb.TokenScores(
        logprobs=scores.logprobs,
        entropies=scores.entropies,
        top_k=scores.top_k,
        top_token_ids=scores.top_token_ids,
        top_logprobs=scores.top_logprobs,
    )


def token_scores_from_proto(msg: pb.TokenScores) -> d.TokenScores:
    return d.TokenScores(
        logprobs=tuple(msg.logprobs),
        entropies=tuple(msg.entropies),
        top_k=msg.top_k,
        top_token_ids=tuple(msg.top_token_ids),
        top_logprobs=tuple(msg.top_logprobs),
    )


def processing_to_proto(p: d.LogprobProcessing) -> pb.LogprobProcessing:
    return pb.LogprobProcessing(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        biased_token_ids=p.biased_token_ids,
        logit_bias=p.logit_bias,
        processed=p.processed,
    )


def processing_from_proto(msg: pb.LogprobProcessing, field: str) -> d.LogprobProcessing:
    """Raises ValueError naming ``field`` for values the learner could not reproduce."""
    try:
        return d.LogprobProcessing(
            temperature=msg.temperature,
            top_p=msg.top_p,
            top_k=msg.top_k,
            biased_token_ids=tuple(msg.biased_token_ids),
            logit_bias=msg.logit_bias,
            processed=msg.processed,
        )
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from exc


def sample_to_proto(sample: d.Sample) -> inference_pb.Sample:
    return inference_pb.Sample(
        token_ids=sample.token_ids,
        scores=token_scores_to_proto(sample.scores),
        finish_reason=_FINISH_REASON[sample.finish_reason],
        stop_string=sample.stop_string,
        policy_version=sample.policy_version,
        processing=processing_to_proto(sample.processing) if sample.processing else None,
    )


def sample_from_proto(msg: inference_pb.Sample) -> d.Sample:
    return d.Sample(
        token_ids=tuple(msg.token_ids),
        scores=token_scores_from_proto(msg.scores),
        finish_reason=_enum_from_proto(_FINISH_REASON, msg.finish_reason, "finish_reason"),
        policy_version=msg.policy_version,
        stop_string=msg.stop_string,
        processing=(
            processing_from_proto(msg.processing, "sample.processing")
            if msg.HasField("processing")
            else None
        ),
    )


# --------------------------------------------------------------------------- tools


def tool_call_to_proto(call: d.ToolCall) -> pb.ToolCall:
    return pb.ToolCall(call_id=call.call_id, name=call.name, arguments_json=call.arguments_json)


def tool_call_from_proto(msg: pb.ToolCall) -> d.ToolCall:
    return d.ToolCall(call_id=msg.call_id, name=msg.name, arguments_json=msg.arguments_json)


def tool_result_to_proto(result: d.ToolResult) -> pb.ToolResult:
    msg = pb.ToolResult(
        text=result.text,
        images=[image_to_proto(i) for i in result.images],
        latency_ms=result.latency_ms,
    )
    if result.error is not None:
        msg.error.CopyFrom(
            pb.ToolError(
                kind=_TOOL_ERROR_KIND[result.error.kind],
                message=result.error.message,
            )
        )
    return msg


def tool_result_from_proto(msg: pb.ToolResult) -> d.ToolResult:
    error = None
    if msg.HasField("error"):
        error = d.ToolError(
            kind=_enum_from_proto(_TOOL_ERROR_KIND, msg.error.kind, "error.kind"),
            message=msg.error.message,
        )
    return d.ToolResult(
        text=msg.text,
        images=tuple(image_from_proto(i) for i in msg.images),
        error=error,
        latency_ms=msg.latency_ms,
    )


def tool_spec_to_proto(spec: d.ToolSpec) -> tools_pb.ToolSpec:
    return tools_pb.ToolSpec(
        name=spec.name,
        description=spec.description,
        parameters_json_schema=spec.parameters_json_schema,
    )


def tool_spec_from_proto(msg: tools_pb.ToolSpec) -> d.ToolSpec:
    return d.ToolSpec(
        name=msg.name,
        description=msg.description,
        parameters_json_schema=msg.parameters_json_schema,
    )


# --------------------------------------------------------------------------- rewards


def reward_to_proto(reward: d.Reward) -> pb.Reward:
    msg = pb.Reward(
        total=reward.total,
        correct=reward.correct,
        accuracy=reward.accuracy,
        format=reward.format,
        tool_bonus=reward.tool_bonus,
        checker=reward.checker,
        reason=reward.reason,
        timed_out=reward.timed_out,
    )
    if reward.extracted is not None:
        msg.extracted = reward.extracted
    return msg


def reward_from_proto(msg: pb.Reward) -> d.Reward:
    return d.Reward(
        total=msg.total,
        correct=msg.correct,
        accuracy=msg.accuracy,
        format=msg.format,
        tool_bonus=msg.tool_bonus,
        extracted=msg.extracted if msg.HasField("extracted") else None,
        checker=msg.checker,
        reason=msg.reason,
        timed_out=msg.timed_out,
    )


def reward_weights_to_proto(weights: d.RewardWeights) -> verifier_pb.RewardWeights:
    return verifier_pb.RewardWeights(
        accuracy=weights.accuracy, format=weights.format, tool_bonus=weights.tool_bonus
    )


def reward_weights_from_proto(
    msg: verifier_pb.RewardWeights, defaults: d.RewardWeights
) -> d.RewardWeights:
    """Fields the message leaves unset take the value from ``defaults``."""
    return d.RewardWeights(
        accuracy=msg.accuracy if msg.HasField("accuracy") else defaults.accuracy,
        format=msg.format if msg.HasField("format") else defaults.format,
        tool_bonus=msg.tool_bonus if msg.HasField("tool_bonus") else defaults.tool_bonus,
    )


def score_item_to_proto(item: d.ScoreItem) -> verifier_pb.ScoreItem:
    msg = verifier_pb.ScoreItem(
        item_id=item.item_id,
        output=item.output,
        gold=item.gold,
        kind=_ANSWER_KIND[item.kind],
        choices=item.choices,
        tool_calls=item.tool_calls,
        time_limit_ms=round(item.time_limit_s * 1000) if item.time_limit_s else 0,
    )
    if item.rel_tol is not None:
        msg.rel_tol = item.rel_tol
    if item.abs_tol is not None:
        msg.abs_tol = item.abs_tol
    return msg


def score_item_from_proto(msg: verifier_pb.ScoreItem) -> d.ScoreItem:
    """Raises ValueError naming the field when the item is unusable (no kind, bad tolerance)."""
    kind = _enum_from_proto(_ANSWER_KIND, msg.kind, "kind")
    rel_tol = msg.rel_tol if msg.HasField("rel_tol") else None
    abs_tol = msg.abs_tol if msg.HasField("abs_tol") else None
    for name, tol in (("rel_tol", rel_tol), ("abs_tol", abs_tol)):
        if tol is not None and not tol >= 0:  # also rejects NaN
            raise ValueError(f"{name}: must be a number >= 0, got {tol}")
    return d.ScoreItem(
        output=msg.output,
        gold=msg.gold,
        kind=kind,
        item_id=msg.item_id,
        choices=tuple(msg.choices),
        rel_tol=rel_tol,
        abs_tol=abs_tol,
        tool_calls=msg.tool_calls,
        time_limit_s=msg.time_limit_ms / 1000 if msg.time_limit_ms else None,
    )


# --------------------------------------------------------------------------- trajectories


def segment_to_proto(seg: d.Segment) -> pb.Segment:
    return pb.Segment(
        kind=_SEGMENT_KIND[seg.kind],
        start=seg.start,
        end=seg.end,
        policy_version=seg.policy_version,
    )


def segment_from_proto(msg: pb.Segment, field: str = "segment") -> d.Segment:
    return d.Segment(
        kind=_enum_from_proto(_SEGMENT_KIND, msg.kind, f"{field}.kind"),
        start=msg.start,
        end=msg.end,
        policy_version=msg.policy_version,
    )


def trajectory_to_proto(traj: d.Trajectory) -> pb.Trajectory:
    msg = pb.Trajectory(
        trajectory_id=traj.trajectory_id,
        token_ids=traj.token_ids,
        loss_mask=bytes(traj.loss_mask),
        logprobs=traj.logprobs,
        entropies=traj.entropies,
        segments=[segment_to_proto(s) for s in traj.segments],
        tool_calls=[
            pb.ToolInvocation(
                call=tool_call_to_proto(t.call),
                result=tool_result_to_proto(t.result),
                segment_index=t.segment_index,
            )
            for t in traj.tool_calls
        ],
        image_sha256=traj.image_sha256,
        prompt_length=traj.prompt_length,
        resampled_from=traj.resampled_from,
        frozen_prefix_length=traj.frozen_prefix_length,
        truncated=traj.truncated,
    )
    if traj.reward is not None:
        msg.reward.CopyFrom(reward_to_proto(traj.reward))
    return msg


def trajectory_from_proto(msg: pb.Trajectory) -> d.Trajectory:
    """Raises ValueError naming the trajectory and field on any inconsistency."""
    where = f"trajectory {msg.trajectory_id!r}"
    mask = msg.loss_mask
    if mask.strip(b"\x00\x01"):
        raise ValueError(f"{where}: loss_mask must hold only 0 and 1 bytes")
    traj = d.Trajectory(
        trajectory_id=msg.trajectory_id,
        token_ids=tuple(msg.token_ids),
        loss_mask=tuple(b == 1 for b in mask),
        logprobs=tuple(msg.logprobs),
        entropies=tuple(msg.entropies),
        segments=tuple(
            segment_from_proto(s, f"{where}: segments[{i}]") for i, s in enumerate(msg.segments)
        ),
        prompt_length=msg.prompt_length,
        tool_calls=tuple(
            d.ToolInvocation(
                call=tool_call_from_proto(t.call),
                result=tool_result_from_proto(t.result),
                segment_index=t.segment_index,
            )
            for t in msg.tool_calls
        ),
        image_sha256=tuple(msg.image_sha256),
        reward=reward_from_proto(msg.reward) if msg.HasField("reward") else None,
        resampled_from=msg.resampled_from,
        frozen_prefix_length=msg.frozen_prefix_length,
        truncated=msg.truncated,
    )
    traj.validate()
    return traj


def group_to_proto(group: d.Group) -> pb.Group:
    return pb.Group(
        group_id=group.group_id,
        question_id=group.question_id,
        trajectories=[trajectory_to_proto(t) for t in group.trajectories],
        images=[image_to_proto(i) for i in group.images],
        policy_version=group.policy_version,
        job_id=group.job_id,
        created_at=group.created_at,
        timings=dict(group.timings),
        sampling=processing_to_proto(group.sampling),
    )


def group_from_proto(msg: pb.Group) -> d.Group:
    return d.Group(
        group_id=msg.group_id,
        question_id=msg.question_id,
        trajectories=tuple(trajectory_from_proto(t) for t in msg.trajectories),
        images=tuple(image_from_proto(i) for i in msg.images),
        policy_version=msg.policy_version,
        job_id=msg.job_id,
        created_at=msg.created_at,
        timings=tuple(sorted((k, float(v)) for k, v in msg.timings.items())),
        sampling=(
            processing_from_proto(msg.sampling, f"group {msg.group_id}: sampling")
            if msg.HasField("sampling")
            else d.LogprobProcessing()
        ),
    )
