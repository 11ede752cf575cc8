"""AXPO's pure selection functions (axpo.algorithm): when to resample, which thinking prefixes
are candidates, which are kept, and how the resample budget is spread; hand-built rollouts."""

from __future__ import annotations

import pytest

from axpo import algorithm as alg
from axpo.contracts.domain import (
    Reward,
    Segment,
    SegmentKind,
    ToolCall,
    ToolInvocation,
    ToolResult,
    Trajectory,
)

PROMPT = 3


def rollout(
    tid: str,
    correct: bool,
    calls: list[tuple[float, ...]] = (),  # type: ignore[assignment]
    *,
    parent: str = "",
    logprob: float = -0.5,
) -> Trajectory:
    """A rollout: prompt (3 tokens), then per tool call: 2 think tokens, the call tokens (one
    entropy per token given), 2 tool-response tokens; then 2 answer tokens."""
    segs: list[Segment] = [Segment(SegmentKind.PROMPT, 0, PROMPT)]
    mask: list[bool] = [False] * PROMPT
    ent: list[float] = [0.0] * PROMPT
    pos = PROMPT
    invocations = []
    for k, entropies in enumerate(calls):
        segs.append(Segment(SegmentKind.THINK, pos, pos + 2))
        mask += [True, True]
        ent += [0.1, 0.1]
        pos += 2
        segs.append(Segment(SegmentKind.TOOL_CALL, pos, pos + len(entropies)))
        mask += [True] * len(entropies)
        ent += list(entropies)
        pos += len(entropies)
        invocations.append(
            ToolInvocation(ToolCall(f"call_{k}", "zoom", "{}"), ToolResult("ok"), len(segs) - 1)
        )
        segs.append(Segment(SegmentKind.TOOL_RESPONSE, pos, pos + 2))
        mask += [False, False]
        ent += [0.0, 0.0]
        pos += 2
    segs.append(Segment(SegmentKind.ANSWER, pos, pos + 2))
    mask += [True, True]
    ent += [0.2, 0.2]
    pos += 2
    return Trajectory(
        trajectory_id=tid,
        token_ids=tuple(range(pos)),
        loss_mask=tuple(mask),
        logprobs=tuple(logprob if m else 0.0 for m in mask),
        entropies=tuple(ent),
        segments=tuple(segs),
        prompt_length=PROMPT,
        tool_calls=tuple(invocations),
        reward=Reward(float(correct), correct, float(correct), 0.0, 0.0, None, "choice", ""),
        resampled_from=parent,
    )


def test_all_wrong_tool_subgroup_with_mixed_non_tool_results_is_resampled() -> None:
    group = [
        rollout("a", False, [(0.5, 0.5)]),
        rollout("b", True),  # a correct rollout without tools does not rescue the tool subgroup
        rollout("c", False, [(1.5, 0.5)]),
        rollout("d", False),
    ]
    assert alg.needs_resampling(group)
    cands = alg.prefix_candidates(group)
    assert [(c.trajectory_id, c.prefix_length) for c in cands] == [("a", 5), ("c", 5)]
    assert cands[0].uncertainty == pytest.approx(0.5)
    assert cands[1].uncertainty == pytest.approx(1.0)
    kept = alg.select_prefixes(cands, rho=0.25)
    assert [c.trajectory_id for c in kept] == ["c"]  # the most uncertain call
    assert alg.resample_counts(len(kept), group_size=4) == [2]


def test_no_tool_use_or_a_correct_tool_rollout_means_no_resampling() -> None:
    no_tools = [rollout("a", False), rollout("b", False), rollout("c", True)]
    assert not alg.needs_resampling(no_tools)
    assert alg.prefix_candidates(no_tools) == []
    rescued = [rollout("a", False, [(1.0,)]), rollout("b", True, [(0.2,)])]
    assert not alg.needs_resampling(rescued)
    assert alg.prefix_candidates(rescued) == []


def test_all_correct_group_is_not_resampled() -> None:
    group = [rollout("a", True, [(1.0,)]), rollout("b", True, [(2.0,)]), rollout("c", True)]
    assert not alg.needs_resampling(group)


def test_a_rollout_without_reward_counts_as_wrong() -> None:
    t = rollout("a", False, [(1.0,)])
    unscored = Trajectory(**{**t.__dict__, "reward": None})
    assert alg.needs_resampling([unscored])


def test_resamples_do_not_count_toward_the_condition() -> None:
    group = [rollout("a", False, [(1.0,)]), rollout("r", True, [(1.0,)], parent="a")]
    assert alg.needs_resampling(group)
    assert [c.trajectory_id for c in alg.prefix_candidates(group)] == ["a"]


def test_ties_keep_rollout_order_and_at_least_one_is_kept() -> None:
    group = [rollout(t, False, [(0.7, 0.7)]) for t in "abcd"]
    cands = alg.prefix_candidates(group)
    assert [c.trajectory_id for c in alg.select_prefixes(cands, 0.5)] == ["a", "b"]
    assert [c.trajectory_id for c in alg.select_prefixes(cands[:3], 0.25)] == ["a"]
    assert alg.select_prefixes([], 0.25) == []


def test_any_anchor_makes_every_call_a_candidate() -> None:
    group = [rollout("a", False, [(0.1,), (0.9,)]), rollout("b", False, [(0.4,)])]
    first = alg.prefix_candidates(group, anchor="first")
    anyc = alg.prefix_candidates(group, anchor="any")
    assert [(c.trajectory_id, c.prefix_length) for c in first] == [("a", 5), ("b", 5)]
    # The second call of a starts after think(2)+call(1)+response(2)+think(2).
    assert [(c.trajectory_id, c.prefix_length) for c in anyc] == [("a", 5), ("a", 10), ("b", 5)]
    assert alg.select_prefixes(anyc, 0.34)[0].prefix_length == 10


@pytest.mark.parametrize(
    ("score", "expected"),
    [("mean_entropy", 1.0), ("first_token_entropy", 1.5), ("neg_mean_logprob", 0.25)],
)
def test_uncertainty_scores(score: alg.Uncertainty, expected: float) -> None:
    t = rollout("a", False, [(1.5, 0.5)], logprob=-0.25)
    assert alg.uncertainty_score(t, 5, 7, score) == pytest.approx(expected)


def test_uncertainty_rejects_an_empty_span_and_unknown_scores() -> None:
    t = rollout("a", False, [(1.0,)])
    with pytest.raises(ValueError, match="empty or outside"):
        alg.uncertainty_score(t, 5, 5, "mean_entropy")
    with pytest.raises(ValueError, match="unknown uncertainty"):
        alg.uncertainty_score(t, 5, 6, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anchor"):
        alg.prefix_candidates([t], anchor="last")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kept", "group_size", "k", "expected"),
    [
        (1, 8, None, [4]),
        (2, 8, None, [2, 2]),
        (3, 8, None, [2, 1, 1]),
        (6, 8, None, [1] * 6),  # budget smaller than the kept prefixes: one each
        (0, 8, None, []),
        (3, 8, 2, [2, 2, 2]),
    ],
)
def test_resample_counts(kept: int, group_size: int, k: int | None, expected: list[int]) -> None:
    assert alg.resample_counts(kept, group_size, k) == expected


def test_select_prefixes_rejects_bad_rho() -> None:
    with pytest.raises(ValueError, match="rho"):
        alg.select_prefixes([], 0.0)


def _first_turn(t: Trajectory) -> Trajectory:
    """``t`` cut after its first assistant turn (up to the end of its first call, or whole
    when it called no tool), without reward or invocations, as the rollout loop has it then."""
    call = next((s for s in t.segments if s.kind == SegmentKind.TOOL_CALL), None)
    end = call.end if call else len(t.token_ids)
    segs = tuple(s for s in t.segments if s.start < end)
    return Trajectory(
        trajectory_id=t.trajectory_id,
        token_ids=t.token_ids[:end],
        loss_mask=t.loss_mask[:end],
        logprobs=t.logprobs[:end],
        entropies=t.entropies[:end],
        segments=segs,
        prompt_length=t.prompt_length,
    )


@pytest.mark.parametrize("rho", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("score", ["mean_entropy", "first_token_entropy", "neg_mean_logprob"])
def test_speculative_prefixes_are_the_ones_kept_once_the_condition_holds(
    rho: float, score: alg.Uncertainty
) -> None:
    group = [
        rollout("a", False, [(0.5, 0.9), (2.0, 2.0)]),
        rollout("b", False),
        rollout("c", False, [(1.5, 0.1)]),
        rollout("d", True),
        rollout("e", False, [(0.7, 0.7)], logprob=-2.0),
        rollout("f", False, [(0.7, 0.7)]),
    ]
    assert alg.needs_resampling(group)
    callers = [bool(t.tool_calls) for t in group]
    early = alg.speculative_prefixes([_first_turn(t) for t in group], callers, score=score, rho=rho)
    final = alg.select_prefixes(alg.prefix_candidates(group, anchor="first", score=score), rho)
    assert early == final
    assert len(early) == max(1, int(rho * 4))


def test_speculative_prefixes_skip_rollouts_that_will_not_call() -> None:
    # Rollout "a" wrote a call its turn cannot run (cut by a budget): not a caller, no candidate.
    group = [rollout("a", False, [(3.0,)]), rollout("b", False, [(1.0,)])]
    early = alg.speculative_prefixes([_first_turn(t) for t in group], [False, True], rho=1.0)
    assert [c.trajectory_id for c in early] == ["b"]
    assert alg.speculative_prefixes([_first_turn(t) for t in group], [False, False]) == []
    with pytest.raises(ValueError, match="2 first turns but 1 caller"):
        alg.speculative_prefixes([_first_turn(t) for t in group], [True])
