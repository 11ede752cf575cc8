"""What ``axpo eval`` measures (axpo_rollout.evaluate_metrics), on hand-made groups whose
figures are worked out by hand: valid against failed tool calls, accuracy with and without
tools, pass@k per question and averaged, per family and overall, and the per-question
records read back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import pytest

from axpo.contracts.domain import (
    AnswerKind,
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
from axpo.study.tasks import Task
from axpo_rollout.evaluate_metrics import (
    ARGUMENTS_CHARS,
    CallResult,
    QuestionResult,
    check_ks,
    question_result,
    summarize,
)

ZOOM = "image_zoom_in_tool"
VALID = (ZOOM, None)
MALFORMED = ("", ToolErrorKind.MALFORMED_CALL)
PROMPT = 3


def task(family: str, seed: int, chance: float = 0.25) -> Task:
    return Task(
        task_id=f"{family}-{seed}",
        question="?",
        image=None,
        gold="A",
        kind=AnswerKind.CHOICE,
        choices=("A", "B"),
        family=family,
        seed=seed,
        chance=chance,
    )


def rollout(
    correct: bool,
    calls: Sequence[tuple[str, ToolErrorKind | None]] = (),
    *,
    tokens: int = 5,
    truncated: bool = False,
    scored: bool = True,
    resampled_from: str = "",
) -> Trajectory:
    n = PROMPT + tokens
    invocations = tuple(
        ToolInvocation(
            ToolCall(f"call_{i}", name, json.dumps({"i": i})),
            ToolResult(error=None if kind is None else ToolError(kind, "failed")),
            segment_index=1,
        )
        for i, (name, kind) in enumerate(calls)
    )
    reward = Reward(
        total=float(correct),
        correct=correct,
        accuracy=float(correct),
        format=0.0,
        tool_bonus=0.0,
        extracted="A" if correct else "B",
        checker="choice",
        reason="",
    )
    return Trajectory(
        trajectory_id="t",
        token_ids=(1,) * n,
        loss_mask=(False,) * PROMPT + (True,) * tokens,
        logprobs=(0.0,) * n,
        entropies=(0.0,) * n,
        segments=(Segment(SegmentKind.PROMPT, 0, PROMPT), Segment(SegmentKind.ANSWER, PROMPT, n)),
        prompt_length=PROMPT,
        tool_calls=invocations,
        reward=reward if scored else None,
        truncated=truncated,
        resampled_from=resampled_from,
    )


def group(t: Task, rollouts: Sequence[Trajectory]) -> Group:
    return Group(group_id=f"g-{t.task_id}", question_id=t.task_id, trajectories=tuple(rollouts))


def results() -> list[QuestionResult]:
    a1, a2, b1 = task("a", 1), task("a", 2), task("b", 1, chance=0.1)
    return [
        question_result(
            a1,
            group(
                a1,
                [
                    rollout(True, tokens=4),
                    rollout(False, [VALID], tokens=6),
                    rollout(True, [MALFORMED], tokens=8),
                    rollout(False, tokens=2, truncated=True),
                ],
            ),
        ),
        question_result(
            b1, group(b1, [rollout(False), rollout(False), rollout(False), rollout(False)])
        ),
        question_result(
            a2, group(a2, [rollout(False), rollout(False), rollout(False), rollout(True, [VALID])])
        ),
    ]


def test_a_call_is_valid_only_when_its_result_has_no_error() -> None:
    t = task("a", 1)
    calls = [
        VALID,
        MALFORMED,
        ("no_such_tool", ToolErrorKind.UNKNOWN_TOOL),
        (ZOOM, ToolErrorKind.BAD_ARGUMENTS),
        ("python", ToolErrorKind.TIMEOUT),
    ]
    [sample] = question_result(t, group(t, [rollout(True, calls)])).samples
    assert sample.tool_calls == (
        CallResult(ZOOM, True, None, '{"i": 0}'),
        CallResult("", False, "malformed_call", '{"i": 1}'),
        CallResult("no_such_tool", False, "unknown_tool", '{"i": 2}'),
        CallResult(ZOOM, False, "bad_arguments", '{"i": 3}'),
        CallResult("python", False, "timeout", '{"i": 4}'),
    )
    assert summarize([question_result(t, group(t, [rollout(True, calls)]))], [1])[
        "tool_call_valid_rate"
    ] == pytest.approx(0.2)


def test_long_arguments_are_cut() -> None:
    t = task("a", 1)
    long_call = ToolInvocation(ToolCall("c", "python", "x" * 5000), ToolResult(), segment_index=1)
    traj = replace(rollout(True), tool_calls=(long_call,))
    [sample] = question_result(t, group(t, [traj])).samples
    assert sample.tool_calls[0].arguments == "x" * ARGUMENTS_CHARS


def test_figures_worked_out_by_hand() -> None:
    s = summarize(results(), [1, 2, 4])
    a, b = s["families"]["a"], s["families"]["b"]
    assert list(s["families"]) == ["a", "b"]  # order of first appearance
    # Family a: question 1 has 2 of 4 correct, question 2 has 1 of 4.
    assert a["questions"] == 2
    assert a["n"] == 4
    assert a["rollouts"] == 8
    assert a["pass_at_1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert a["pass_at_2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2, abs=1e-6)
    assert a["pass_at_4"] == 1.0
    assert a["accuracy"] == pytest.approx(3 / 8)
    assert a["tool_call_rate"] == pytest.approx(3 / 8)
    assert a["tool_calls"] == 3
    assert a["tool_call_valid_rate"] == pytest.approx(2 / 3, abs=1e-6)
    assert a["rollouts_with_tools"] == 3
    assert a["accuracy_with_tools"] == pytest.approx(2 / 3, abs=1e-6)  # the malformed one won
    assert a["rollouts_without_tools"] == 5
    assert a["accuracy_without_tools"] == pytest.approx(1 / 5)
    assert a["mean_generated_tokens"] == pytest.approx((4 + 6 + 8 + 2 + 4 * 5) / 8)
    assert a["truncated_rate"] == pytest.approx(1 / 8)
    assert a["chance"] == pytest.approx(0.25)
    # Family b: nothing right, no tool calls: the rates over calls are None, not 0.
    assert b["pass_at_4"] == 0.0
    assert b["accuracy"] == 0.0
    assert b["tool_calls"] == 0
    assert b["tool_call_valid_rate"] is None
    assert b["accuracy_with_tools"] is None
    assert b["accuracy_without_tools"] == 0.0
    assert b["chance"] == pytest.approx(0.1)
    # Overall: every question weighs the same.
    assert s["questions"] == 3
    assert s["rollouts"] == 12
    assert s["pass_at_1"] == pytest.approx((0.5 + 0.25 + 0.0) / 3, abs=1e-6)
    assert s["pass_at_4"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["accuracy"] == pytest.approx(3 / 12)
    assert s["tool_call_rate"] == pytest.approx(3 / 12)
    assert s["accuracy_with_tools"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["accuracy_without_tools"] == pytest.approx(1 / 9, abs=1e-6)
    assert s["chance"] == pytest.approx(0.2)


def test_an_unscored_rollout_is_wrong_and_has_no_answer() -> None:
    t = task("a", 1)
    r = question_result(t, group(t, [rollout(True, scored=False), rollout(True)]))
    assert [(s.answer, s.correct) for s in r.samples] == [(None, False), ("A", True)]
    assert r.correct == 1


def test_records_read_back_to_the_same_summary() -> None:
    rs = results()
    records = [json.loads(json.dumps(r.to_json([1, 2]))) for r in rs]
    assert records[0]["pass_at_2"] == pytest.approx(1 - 1 / 6)
    assert records[0]["correct"] == 2
    assert records[0]["samples"][2] == {
        "answer": "A",
        "correct": True,
        "tool_calls": [
            {"name": "", "valid": False, "error": "malformed_call", "arguments": '{"i": 0}'}
        ],
        "tokens": 8,
        "truncated": False,
    }
    back = [QuestionResult.from_json(r) for r in records]
    assert back == rs
    assert summarize(back, [1, 2]) == summarize(rs, [1, 2])


def test_bad_input_is_refused_with_a_reason() -> None:
    t, other = task("a", 1), task("a", 2)
    with pytest.raises(ValueError, match="resampled rollouts"):
        question_result(t, group(t, [rollout(True), rollout(True, resampled_from="x")]))
    with pytest.raises(ValueError, match="not a-1"):
        question_result(t, group(other, [rollout(True)]))
    with pytest.raises(ValueError, match="no rollouts"):
        question_result(t, group(t, []))
    with pytest.raises(ValueError, match="no questions"):
        summarize([], [1])
    with pytest.raises(ValueError, match=r"1 <= k <= n = 4 .* k = \[5\]"):
        summarize(results(), [1, 5])
    with pytest.raises(ValueError, match="at least one k"):
        check_ks([], 4)
    assert check_ks([4, 1, 4], 4) == (1, 4)
