"""Round trips domain -> protobuf -> bytes -> protobuf -> domain for every converter pair."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from axpo.contracts import convert as c
from axpo.contracts import domain as d
from axpo.v1 import common_pb2 as pb
from axpo.v1 import verifier_pb2 as verifier_pb

# float32 wire fields: draw values exactly representable in float32 so equality is exact.
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
f64 = st.floats(allow_nan=False, allow_infinity=False)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
text = st.text(max_size=40)


def wire(msg):  # serialize and parse back, as the network would
    return type(msg).FromString(msg.SerializeToString())


images = st.builds(
    d.Image.from_bytes, st.binary(max_size=64), st.sampled_from(["image/png", "image/jpeg"])
) | st.builds(d.Image, sha256=st.text("0123456789abcdef", min_size=64, max_size=64))

sampling = st.builds(
    d.SamplingParams,
    n=st.integers(1, 64),
    temperature=f32.filter(lambda x: x >= 0),
    top_p=st.floats(0.0, 1.0, width=32, exclude_min=True),
    top_k=st.integers(0, 1000),
    max_tokens=st.integers(1, 100_000),
    stop_token_ids=st.lists(i32, max_size=4).map(tuple),
    stop_strings=st.lists(text, max_size=3).map(tuple),
    seed=st.none() | st.integers(0, 2**64 - 1),
    top_logprobs=st.integers(0, 20),
)


@st.composite
def token_scores(draw):
    n = draw(st.integers(0, 8))
    k = draw(st.integers(0, 3))
    return d.TokenScores(
        logprobs=tuple(draw(st.lists(f32, min_size=n, max_size=n))),
        entropies=tuple(draw(st.lists(f32, min_size=n, max_size=n))),
        top_k=k,
        top_token_ids=tuple(draw(st.lists(i32, min_size=n * k, max_size=n * k))),
        top_logprobs=tuple(draw(st.lists(f32, min_size=n * k, max_size=n * k))),
    )


samples = st.builds(
    d.Sample,
    token_ids=st.lists(i32, max_size=8).map(tuple),
    scores=token_scores(),
    finish_reason=st.sampled_from(d.FinishReason),
    policy_version=st.integers(0, 2**64 - 1),
    stop_string=text,
)
tool_calls = st.builds(d.ToolCall, call_id=text, name=text, arguments_json=text)
tool_errors = st.builds(d.ToolError, kind=st.sampled_from(d.ToolErrorKind), message=text)
tool_results = st.builds(
    d.ToolResult,
    text=text,
    images=st.lists(images, max_size=2).map(tuple),
    error=st.none() | tool_errors,
    latency_ms=f64,
)
rewards = st.builds(
    d.Reward,
    total=f64,
    correct=st.booleans(),
    accuracy=f64,
    format=f64,
    tool_bonus=f64,
    extracted=st.none() | text,
    checker=text,
    reason=text,
    timed_out=st.booleans(),
)
score_items = st.builds(
    d.ScoreItem,
    output=text,
    gold=text,
    kind=st.sampled_from(d.AnswerKind),
    item_id=text,
    choices=st.lists(text, max_size=4).map(tuple),
    rel_tol=st.none() | st.floats(0, 1),
    abs_tol=st.none() | st.floats(0, 10),
    tool_calls=st.integers(0, 100),
    time_limit_s=st.none() | st.integers(1, 60_000).map(lambda ms: ms / 1000),
)


@st.composite
def trajectories(draw):
    prompt = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(1, 4), max_size=4))
    segs = [d.Segment(d.SegmentKind.PROMPT, 0, prompt)]
    pos = prompt
    for i, length in enumerate(lengths):
        kind = [d.SegmentKind.THINK, d.SegmentKind.TOOL_CALL, d.SegmentKind.TOOL_RESPONSE][i % 3]
        segs.append(d.Segment(kind, pos, pos + length, draw(st.integers(0, 9))))
        pos += length
    n = pos
    mask = (False,) * prompt + tuple(
        draw(st.lists(st.booleans(), min_size=n - prompt, max_size=n - prompt))
    )
    invocations = tuple(
        d.ToolInvocation(call=draw(tool_calls), result=draw(tool_results), segment_index=i)
        for i in range(draw(st.integers(0, 2)))
    )
    return d.Trajectory(
        trajectory_id=draw(text),
        token_ids=tuple(draw(st.lists(i32, min_size=n, max_size=n))),
        loss_mask=mask,
        logprobs=tuple(draw(st.lists(f32, min_size=n, max_size=n))),
        entropies=tuple(draw(st.lists(f32, min_size=n, max_size=n))),
        segments=tuple(segs),
        prompt_length=prompt,
        tool_calls=invocations,
        image_sha256=tuple(draw(st.lists(text, max_size=2))),
        reward=draw(st.none() | rewards),
        resampled_from=draw(text),
        frozen_prefix_length=draw(st.integers(0, n)),
        truncated=draw(st.booleans()),
    )


groups = st.builds(
    d.Group,
    group_id=text,
    question_id=text,
    trajectories=st.lists(trajectories(), max_size=3).map(tuple),
    images=st.lists(images, max_size=2).map(tuple),
    policy_version=st.integers(0, 2**64 - 1),
    job_id=text,
    created_at=f64,
    timings=st.dictionaries(text, f64, max_size=3).map(lambda m: tuple(sorted(m.items()))),
)


@pytest.mark.parametrize(
    ("strategy", "to_proto", "from_proto"),
    [
        (images, c.image_to_proto, c.image_from_proto),
        (sampling, c.sampling_params_to_proto, c.sampling_params_from_proto),
        (token_scores(), c.token_scores_to_proto, c.token_scores_from_proto),
        (samples, c.sample_to_proto, c.sample_from_proto),
        (tool_calls, c.tool_call_to_proto, c.tool_call_from_proto),
        (tool_results, c.tool_result_to_proto, c.tool_result_from_proto),
        (rewards, c.reward_to_proto, c.reward_from_proto),
        (score_items, c.score_item_to_proto, c.score_item_from_proto),
        (trajectories(), c.trajectory_to_proto, c.trajectory_from_proto),
        (groups, c.group_to_proto, c.group_from_proto),
    ],
    ids=lambda x: getattr(x, "__name__", None) or "strategy",
)
def test_round_trip(strategy, to_proto, from_proto):
    @given(strategy)
    def check(value):
        assert from_proto(wire(to_proto(value))) == value

    check()


def test_tool_spec_round_trip():
    spec = d.ToolSpec("image_zoom_in_tool", "Zoom in.", '{"type": "object"}')
    assert c.tool_spec_from_proto(wire(c.tool_spec_to_proto(spec))) == spec


def test_reward_weights_unset_fields_take_defaults():
    defaults = d.RewardWeights(accuracy=1.0, format=0.2, tool_bonus=0.3)
    msg = verifier_pb.RewardWeights(format=0.0)
    assert c.reward_weights_from_proto(msg, defaults) == d.RewardWeights(1.0, 0.0, 0.3)
    full = d.RewardWeights(0.5, 0.25, 0.125)
    assert c.reward_weights_from_proto(c.reward_weights_to_proto(full), defaults) == full


def test_unspecified_enum_is_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="kind: unspecified"):
        c.score_item_from_proto(verifier_pb.ScoreItem(output="x", gold="y"))


def test_negative_tolerance_is_rejected():
    msg = verifier_pb.ScoreItem(kind=pb.ANSWER_KIND_NUMBER, rel_tol=-1)
    with pytest.raises(ValueError, match="rel_tol"):
        c.score_item_from_proto(msg)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: setattr(m, "loss_mask", b"\x00\x02\x01"), "only 0 and 1"),
        (lambda m: m.logprobs.append(0.0), "logprobs has 4 entries"),
        (lambda m: setattr(m.segments[1], "end", 2), "segments end at 2"),
        (lambda m: setattr(m, "loss_mask", b"\x01\x01\x01"), "covers prompt"),
    ],
    ids=["mask-bytes", "length-mismatch", "segment-gap", "prompt-masked"],
)
def test_inconsistent_trajectory_is_rejected(mutate, message):
    msg = pb.Trajectory(
        trajectory_id="q1/0",
        token_ids=[1, 2, 3],
        loss_mask=b"\x00\x01\x01",
        logprobs=[0, -1, -2],
        entropies=[0, 1, 1],
        segments=[
            pb.Segment(kind=pb.SEGMENT_KIND_PROMPT, start=0, end=1),
            pb.Segment(kind=pb.SEGMENT_KIND_THINK, start=1, end=3),
        ],
        prompt_length=1,
    )
    assert c.trajectory_from_proto(msg).loss_mask == (False, True, True)
    mutate(msg)
    with pytest.raises(ValueError, match=message):
        c.trajectory_from_proto(msg)
