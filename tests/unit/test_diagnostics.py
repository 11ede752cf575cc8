"""axpo.algorithm.diagnostics: step diagnostics on hand-built groups, every number worked out
by hand."""

from __future__ import annotations

import pytest

from axpo.algorithm.diagnostics import DIAGNOSTIC_HELP, DIAGNOSTIC_KEYS, step_diagnostics
from axpo.contracts.domain import (
    Group,
    Reward,
    Segment,
    SegmentKind,
    ToolCall,
    ToolError,
    ToolErrorKind,
    ToolInvocation,
    ToolResult,
    Trajectory,
)

K = SegmentKind
MODEL_WRITTEN = {K.THINK, K.TOOL_CALL, K.ANSWER}
Call = ToolErrorKind | None  # the error of one tool call, None when it succeeded


def traj(
    tid: str,
    correct: bool,
    calls: tuple[Call, ...] = (),
    *,
    total: float | None = None,
    parent: str = "",
    frozen: int = 0,
) -> Trajectory:
    """PROMPT(3), then per call THINK(2) TOOL_CALL(2) TOOL_RESPONSE(3), then THINK(2) ANSWER(1).

    Model-written tokens: 4 per call + 3. Turns: calls + 1. The prefix before the first tool
    call (prompt + first think) is 5 tokens.
    """
    layout = [(K.PROMPT, 3)]
    for _ in calls:
        layout += [(K.THINK, 2), (K.TOOL_CALL, 2), (K.TOOL_RESPONSE, 3)]
    layout += [(K.THINK, 2), (K.ANSWER, 1)]
    segments, mask, pos = [], [], 0
    for kind, n in layout:
        segments.append(Segment(kind, pos, pos + n, policy_version=1))
        mask += [kind in MODEL_WRITTEN] * n
        pos += n
    call_segments = [i for i, s in enumerate(segments) if s.kind is K.TOOL_CALL]
    invocations = tuple(
        ToolInvocation(
            ToolCall(f"{tid}-c{j}", "zoom", "{}"),
            ToolResult(error=None if err is None else ToolError(err, "boom")),
            segment_index=seg,
        )
        for j, (err, seg) in enumerate(zip(calls, call_segments, strict=True))
    )
    reward_total = (1.1 if correct else 0.0) if total is None else total
    t = Trajectory(
        trajectory_id=tid,
        token_ids=tuple(range(pos)),
        loss_mask=tuple(mask),
        logprobs=(0.0,) * pos,
        entropies=(0.0,) * pos,
        segments=tuple(segments),
        prompt_length=3,
        tool_calls=invocations,
        reward=Reward(reward_total, correct, float(correct), 0.1, 0.0, None, "number", ""),
        resampled_from=parent,
        frozen_prefix_length=frozen,
    )
    t.validate()
    return t


def group(gid: str, *trajs: Trajectory, version: int = 0, **timings: float) -> Group:
    return Group(
        group_id=gid,
        question_id=gid,
        trajectories=trajs,
        policy_version=version,
        timings=tuple(sorted(timings.items())),
    )


E = ToolErrorKind


@pytest.fixture
def mixed_step() -> list[Group]:
    # g1: the tool-using originals (o1, o2) are all wrong, a non-tool one (o3) is right; AXPO
    # resampled o1 twice (one recovers) and o2 once (no recovery).
    g1 = group(
        "g1",
        traj("o1", False, (None,)),
        traj("o2", False, (E.BAD_ARGUMENTS,)),
        traj("o3", True),
        traj("o4", False),
        traj("r1", True, (None,), parent="o1", frozen=5),
        traj("r2", False, (E.MALFORMED_CALL,), parent="o1", frozen=5),
        traj("r3", False, (E.TIMEOUT,), parent="o2", frozen=5),
        version=3,
        generate=2.0,
        tools=1.0,
        verify=0.5,
        total=4.0,
    )
    # g2: a tool user is right, so no resampling; no "tools" timing recorded (counts as 0).
    g2 = group(
        "g2",
        traj("p1", True, (None, None)),
        traj("p2", False),
        traj("p3", False, (E.MALFORMED_CALL,), total=0.1),
        version=5,
        generate=4.0,
        verify=1.5,
        total=8.0,
    )
    return [g1, g2]


def test_mixed_step(mixed_step: list[Group]) -> None:
    d = step_diagnostics(mixed_step, learner_version=6)
    expected = {
        "groups": 2,
        "rollouts": 7,
        "resampled_rollouts": 3,
        "reward_mean": (1.1 + 1.1 + 0.1) / 7,
        "accuracy": 2 / 7,
        "accuracy_with_tools": 1 / 4,  # o1 o2 p1 p3: p1
        "accuracy_without_tools": 1 / 3,  # o3 o4 p2: o3
        "rollouts_with_tools": 4,
        "rollouts_without_tools": 3,
        "tool_call_rate": 4 / 7,
        "all_wrong_tool_rate": 1 / 2,  # g1 only
        "resampled_groups": 1,
        "resampled_subgroups": 2,  # (g1, o1), (g1, o2)
        "recovery_rate": 1 / 2,  # (g1, o1) via r1
        # originals 7+7+3+3+11+3+7 = 41 model tokens; each resample 7 - 2 frozen = 5
        "resample_token_share": 15 / 56,
        "tool_calls": 8,  # o1 o2 p1 p1 p3 r1 r2 r3
        "tool_error_rate": 4 / 8,
        "tool_error_rate.bad_arguments": 1 / 8,
        "tool_error_rate.timeout": 1 / 8,
        "tool_error_rate.resource_limit": 0,
        "tool_error_rate.sandbox_violation": 0,
        "tool_error_rate.internal": 0,
        "tool_error_rate.unknown_tool": 0,
        "tool_error_rate.malformed_call": 2 / 8,
        "malformed_call_rate": 2 / 8,
        "turns_mean": (2 + 2 + 1 + 1 + 3 + 1 + 2 + 2 + 2 + 2) / 10,
        "turns_max": 3,
        "policy_lag_mean": 2,  # (6-3 + 6-5) / 2
        "policy_lag_max": 3,
        "time.generate_s": 3.0,
        "time.tools_s": 0.5,
        "time.verify_s": 1.0,
        "time.rollout_s": 6.0,
        "response_tokens_mean": 41 / 7,
        "generated_tokens": 56.0,  # 41 original + 15 resampled (resample_token_share 15 / 56)
    }
    assert set(d) == set(expected) == set(DIAGNOSTIC_HELP)
    assert all(type(v) is float for v in d.values())
    for key, value in expected.items():
        assert d[key] == pytest.approx(value, abs=1e-12), key


def test_no_tools_all_correct() -> None:
    g = group("g", traj("a", True), traj("b", True), version=4)
    d = step_diagnostics([g], learner_version=4)
    assert d["accuracy"] == 1.0
    assert d["accuracy_without_tools"] == 1.0
    assert d["rollouts_with_tools"] == 0.0
    assert d["accuracy_with_tools"] == 0.0  # no tool users: 0, and the count says so
    assert d["tool_call_rate"] == 0.0
    assert d["all_wrong_tool_rate"] == 0.0
    assert d["resampled_subgroups"] == d["recovery_rate"] == d["resample_token_share"] == 0.0
    assert d["tool_calls"] == d["tool_error_rate"] == d["malformed_call_rate"] == 0.0
    assert d["turns_mean"] == d["turns_max"] == 1.0
    assert d["policy_lag_mean"] == d["policy_lag_max"] == 0.0
    assert d["time.rollout_s"] == 0.0  # no timings recorded
    assert d["response_tokens_mean"] == 3.0


def test_all_correct_tool_users_are_not_all_wrong() -> None:
    g = group("g", traj("a", True, (None,)), traj("b", True, (None,)), traj("c", False))
    d = step_diagnostics([g], learner_version=0)
    assert d["tool_call_rate"] == pytest.approx(2 / 3)
    assert d["accuracy_with_tools"] == 1.0
    assert d["accuracy_without_tools"] == 0.0
    assert d["all_wrong_tool_rate"] == 0.0


def test_unrecovered_resamples() -> None:
    g = group(
        "g",
        traj("o", False, (None,)),
        traj("r1", False, (None,), parent="o", frozen=5),
        traj("r2", False, (E.INTERNAL,), parent="o", frozen=5),
    )
    d = step_diagnostics([g], learner_version=0)
    assert d["all_wrong_tool_rate"] == 1.0
    assert d["resampled_groups"] == d["resampled_subgroups"] == 1.0
    assert d["recovery_rate"] == 0.0
    assert d["tool_error_rate.internal"] == pytest.approx(1 / 3)
    # originals only: the resamples' correctness does not enter accuracy
    assert d["rollouts"] == 1.0
    assert d["accuracy"] == 0.0


def test_same_original_id_in_two_groups_is_two_subgroups() -> None:
    g1 = group("g1", traj("o", False, (None,)), traj("r", True, (None,), parent="o", frozen=5))
    g2 = group("g2", traj("o", False, (None,)), traj("r", False, (None,), parent="o", frozen=5))
    d = step_diagnostics([g1, g2], learner_version=0)
    assert d["resampled_subgroups"] == 2.0
    assert d["recovery_rate"] == 0.5


def test_calls_inside_a_frozen_prefix_are_not_counted_again() -> None:
    # Frozen through the first call and its response (3 + 2 + 2 + 3 = 10 tokens): the resample
    # carries the original's first call (an error) and makes one new call of its own.
    o = traj("o", False, (E.BAD_ARGUMENTS, None))
    r = traj("r", False, (E.BAD_ARGUMENTS, None), parent="o", frozen=10)
    d = step_diagnostics([group("g", o, r)], learner_version=0)
    assert d["tool_calls"] == 3.0  # o: 2, r: 1 new
    assert d["tool_error_rate.bad_arguments"] == pytest.approx(1 / 3)
    assert d["turns_max"] == 3.0  # r's turns count over its whole sequence
    # o writes 11 model tokens; r writes 11 - 4 frozen (think + tool call) = 7
    assert d["resample_token_share"] == pytest.approx(7 / 18)


def test_rollout_without_reward_counts_wrong() -> None:
    t = traj("a", True)
    no_reward = Trajectory(**{**t.__dict__, "reward": None})
    d = step_diagnostics([group("g", no_reward, traj("b", True))], learner_version=0)
    assert d["accuracy"] == 0.5
    assert d["reward_mean"] == pytest.approx(1.1 / 2)


def test_empty_input() -> None:
    with pytest.raises(ValueError, match="at least one group"):
        step_diagnostics([], learner_version=0)


def test_help_covers_every_key_in_one_line() -> None:
    assert tuple(DIAGNOSTIC_HELP) == DIAGNOSTIC_KEYS
    assert all(v and "\n" not in v for v in DIAGNOSTIC_HELP.values())
    assert {f"tool_error_rate.{k.value}" for k in ToolErrorKind} <= set(DIAGNOSTIC_KEYS)
