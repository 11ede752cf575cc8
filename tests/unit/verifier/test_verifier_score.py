"""Verifier.score: reward composition, per-item isolation, hostile inputs, time limits."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from axpo.contracts.domain import AnswerKind, Reward, RewardWeights, ScoreItem
from axpo.settings.verifier import VerifierSettings
from axpo_verifier.verifier import EXTRACTED_MAX_CHARS, Verifier

SLACK_S = 3.0
TIME_LIMIT_S = 1.5  # the session verifier's default_time_limit_s (conftest.py)
TOWER = "2^{2^{2^{2^{2^{2^{2^{2}}}}}}}"
CALL = '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox": [0, 0, 5, 5]}}\n</tool_call>'

CHOICE, NUMBER, TEXT, MATH = AnswerKind.CHOICE, AnswerKind.NUMBER, AnswerKind.TEXT, AnswerKind.MATH
DEFAULT = RewardWeights()  # accuracy 1, format 0.1, tool_bonus 0
WITH_TOOLS = RewardWeights(accuracy=1.0, format=0.1, tool_bonus=0.5)


def think(answer: str) -> str:
    return f"<think>Let me look at the image carefully.</think>\n\n{answer}"


@pytest.mark.parametrize(
    ("item", "weights", "total", "correct", "fmt", "tool_bonus"),
    [
        pytest.param(
            ScoreItem(think("The answer is (B)."), "B", CHOICE),
            DEFAULT,
            1.1,
            True,
            1.0,
            0.0,
            id="correct-well-formed",
        ),
        pytest.param(
            ScoreItem(think("(C)"), "B", CHOICE),
            DEFAULT,
            0.1,
            False,
            1.0,
            0.0,
            id="wrong-well-formed",
        ),
        pytest.param(
            ScoreItem("B", "B", CHOICE), DEFAULT, 1.05, True, 0.5, 0.0, id="correct-no-thinking"
        ),
        pytest.param(
            ScoreItem(think("There are 7 apples."), "7", NUMBER, tool_calls=2),
            WITH_TOOLS,
            1.6,
            True,
            1.0,
            1.0,
            id="tool-bonus-when-correct-with-tools",
        ),
        pytest.param(
            ScoreItem(think("There are 8 apples."), "7", NUMBER, tool_calls=2),
            WITH_TOOLS,
            0.1,
            False,
            1.0,
            0.0,
            id="no-tool-bonus-when-wrong",
        ),
        pytest.param(
            ScoreItem(think("There are 7 apples."), "7", NUMBER, tool_calls=0),
            WITH_TOOLS,
            1.1,
            True,
            1.0,
            0.0,
            id="no-tool-bonus-without-tools",
        ),
        pytest.param(
            ScoreItem(
                f"<think>zoom</think>\n{CALL}\n<tool_response>x</tool_response>"
                "<think>ok</think>\\boxed{12}",
                "12",
                NUMBER,
                tool_calls=1,
            ),
            WITH_TOOLS,
            1.6,
            True,
            1.0,
            1.0,
            id="multi-turn-tool-trajectory",
        ),
        pytest.param(
            ScoreItem("<think>truncated reasoning", "7", NUMBER),
            DEFAULT,
            0.02,
            False,
            0.2,
            0.0,
            id="no-answer-format-only",
        ),
        pytest.param(
            ScoreItem(think("Paris"), "paris", TEXT),
            RewardWeights(0.0, 1.0, 0.0),
            1.0,
            True,
            1.0,
            0.0,
            id="format-only-weights",
        ),
        pytest.param(
            ScoreItem(think("17.9"), "17.6", NUMBER, rel_tol=0.05),
            DEFAULT,
            1.1,
            True,
            1.0,
            0.0,
            id="item-rel-tol-chartqa",
        ),
        pytest.param(
            ScoreItem(think("17.9"), "17.6", NUMBER),
            DEFAULT,
            0.1,
            False,
            1.0,
            0.0,
            id="default-rel-tol-1pct",
        ),
        pytest.param(
            ScoreItem(think("18"), "17.6", NUMBER, rel_tol=0.0, abs_tol=0.5),
            DEFAULT,
            1.1,
            True,
            1.0,
            0.0,
            id="item-abs-tol",
        ),
        pytest.param(
            ScoreItem(think("So $\\boxed{\\frac{1}{2}}$."), "0.5", MATH),
            DEFAULT,
            1.1,
            True,
            1.0,
            0.0,
            id="math-correct",
        ),
    ],
)
def test_reward_composition(
    verifier: Verifier,
    item: ScoreItem,
    weights: RewardWeights,
    total: float,
    correct: bool,
    fmt: float,
    tool_bonus: float,
) -> None:
    (reward,) = verifier.score([item], weights)
    assert reward.total == pytest.approx(total), reward.reason
    assert reward.correct is correct, reward.reason
    assert reward.accuracy == (1.0 if correct else 0.0)
    assert reward.format == pytest.approx(fmt)
    assert reward.tool_bonus == tool_bonus
    assert reward.checker == item.kind.value
    assert not reward.timed_out


def test_default_weights_come_from_settings() -> None:
    class NoMath:  # non-math items never touch the pool
        def close(self) -> None:
            pass

    settings = VerifierSettings(reward_weights=RewardWeights(2.0, 0.0, 0.0))
    v = Verifier(settings, math_checker=NoMath())  # type: ignore[arg-type]
    (reward,) = v.score([ScoreItem(think("B"), "B", CHOICE)])
    assert reward.total == 2.0


def test_reasons_and_extracted(verifier: Verifier) -> None:
    rewards = verifier.score(
        [
            ScoreItem(think("The answer is 42."), "42", NUMBER),
            ScoreItem(think(""), "42", NUMBER),
            ScoreItem("42", "42", NUMBER),
        ]
    )
    assert rewards[0].reason == "number 42 == gold 42 (rel_tol 0.01, abs_tol 0)"
    assert rewards[0].extracted == "42"
    assert rewards[1].reason.startswith("no answer found")
    assert rewards[1].extracted is None
    assert "format 0.5: no </think>" in rewards[2].reason


def test_order_is_kept(verifier: Verifier) -> None:
    items = [ScoreItem(think(str(i)), str(i % 3), NUMBER, item_id=str(i)) for i in range(12)]
    rewards = verifier.score(items)
    assert [r.correct for r in rewards] == [i % 3 == i for i in range(12)]


def test_empty_batch(verifier: Verifier) -> None:
    assert verifier.score([]) == []


# --------------------------------------------------------------------------- isolation


def test_exception_in_one_item_zeroes_only_that_item(
    verifier: Verifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: Any) -> None:
        raise ZeroDivisionError("kaboom")

    monkeypatch.setattr("axpo_verifier.verifier.check_number", boom)
    rewards = verifier.score(
        [
            ScoreItem(think("B"), "B", CHOICE),
            ScoreItem(think("7"), "7", NUMBER),
            ScoreItem(think("blue"), "blue", TEXT),
        ]
    )
    assert [r.correct for r in rewards] == [True, False, True]
    assert rewards[1].total == 0.0
    assert rewards[1].format == 0.0
    assert rewards[1].reason == "checker error: ZeroDivisionError: kaboom"


def test_unknown_kind_is_an_item_error(verifier: Verifier) -> None:
    bad = ScoreItem(think("B"), "B", "riddle")  # type: ignore[arg-type]
    rewards = verifier.score([bad, ScoreItem(think("B"), "B", CHOICE)])
    assert rewards[0].total == 0.0
    assert "ValueError" in rewards[0].reason
    assert rewards[1].correct


def test_output_over_limit_is_not_read() -> None:
    class NoMath:
        def close(self) -> None:
            pass

    v = Verifier(VerifierSettings(max_output_chars=100), math_checker=NoMath())  # type: ignore[arg-type]
    (reward,) = v.score([ScoreItem(think("B") + " " * 200, "B", CHOICE)])
    assert reward.total == 0.0
    assert not reward.correct
    assert reward.format == 0.0
    assert "over the limit of 100" in reward.reason
    assert reward.extracted is None


# --------------------------------------------------------------------------- hostile inputs

ONE_MB = "lorem ipsum dolor sit amet " * 40_000
NESTED = "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"


@pytest.mark.parametrize(
    ("output", "gold", "kind"),
    [
        pytest.param(ONE_MB, "B", CHOICE, id="1MB-choice"),
        pytest.param(ONE_MB, "7", NUMBER, id="1MB-number"),
        pytest.param(ONE_MB, "blue", TEXT, id="1MB-text"),
        pytest.param(ONE_MB, "\\frac{1}{2}", MATH, id="1MB-math"),
        pytest.param("<think>" + ONE_MB + "</think>\\boxed{3}", "3", MATH, id="1MB-thinking-math"),
        pytest.param(ONE_MB.replace(" ", "\n"), "7", NUMBER, id="1MB-lines"),
        pytest.param(NESTED, "1", NUMBER, id="5000-nested-braces-number"),
        pytest.param(NESTED, "1", MATH, id="5000-nested-braces-math"),
        pytest.param(
            "\\boxed{" + "{" * 1500 + "1" + "}" * 1500 + "}",
            "1",
            MATH,
            id="1500-nested-braces-math-in-worker",
        ),
        pytest.param(think(f"\\boxed{{{TOWER}}}"), "4", MATH, id="tower-of-exponents"),
        pytest.param(think("\\boxed{9^9^9^9}"), "9^{9^{9^{9}}}", MATH, id="9^9^9^9"),
        pytest.param(think("\\boxed{10^{10^{10^{10}}}!}"), "1", MATH, id="huge-factorial"),
        pytest.param(
            think("\\boxed{" + "+".join(["x^{99}"] * 400) + "}"),
            "(x+1)^{99}",
            MATH,
            id="long-polynomial",
        ),
        pytest.param(
            "\x00<think>\x07a\x1b</think>\x00The answer is \x0b4\x002\x00.",
            "42",
            NUMBER,
            id="control-characters",
        ),
        pytest.param("\x00" * 100_000, "1", MATH, id="nul-bytes"),
        pytest.param("", "B", CHOICE, id="empty-choice"),
        pytest.param("", "1", MATH, id="empty-math"),
        pytest.param("\ud800\udfff\U0010ffff", "x", TEXT, id="surrogates-and-max-codepoint"),
        pytest.param("<tool_call>" + "[" * 200_000, "1", NUMBER, id="deep-json-tool-call"),
    ],
)
def test_hostile_output_gets_a_verdict_in_time(
    verifier: Verifier, output: str, gold: str, kind: AnswerKind
) -> None:
    assert verifier.settings.default_time_limit_s == TIME_LIMIT_S
    start = time.monotonic()
    (reward,) = verifier.score([ScoreItem(output, gold, kind)])
    elapsed = time.monotonic() - start
    assert isinstance(reward, Reward)
    assert elapsed < TIME_LIMIT_S + SLACK_S, reward.reason
    assert reward.checker == kind.value
    assert reward.reason
    assert reward.extracted is None or len(reward.extracted) <= EXTRACTED_MAX_CHARS
    if reward.timed_out:
        assert reward.reason.startswith(f"math check timed out after {TIME_LIMIT_S:g} s")
        assert not reward.correct


def test_hostile_control_characters_still_scored(verifier: Verifier) -> None:
    out = "\x00<think>\x07a\x1b</think>\x00The answer is \x0b4\x002\x00."
    (reward,) = verifier.score([ScoreItem(out, "42", NUMBER)])
    assert reward.correct
    assert reward.extracted == "42"


def test_mixed_batch_one_hostile_item_times_out_others_scored(verifier: Verifier) -> None:
    items = [
        ScoreItem(think("So the answer is \\boxed{\\frac{1}{2}}."), "0.5", MATH, item_id="m1"),
        ScoreItem(think(f"\\boxed{{{TOWER}}}"), "4", MATH, item_id="tower", time_limit_s=1.0),
        ScoreItem(think("The answer is (B)."), "B", CHOICE, item_id="c"),
        ScoreItem(think("There are seven apples."), "7", NUMBER, item_id="n"),
        ScoreItem(think("green"), "blue", TEXT, item_id="t"),
        ScoreItem(think("\\boxed{x^2+2x+1}"), "(x+1)^2", MATH, item_id="m2"),
        ScoreItem(think("\\boxed{[0, 1)}"), "(0, 1]", MATH, item_id="m3"),
    ]
    start = time.monotonic()
    rewards = verifier.score(items)
    elapsed = time.monotonic() - start
    assert elapsed < TIME_LIMIT_S + SLACK_S
    by_id = {item.item_id: reward for item, reward in zip(items, rewards, strict=True)}
    tower = by_id.pop("tower")
    assert tower.timed_out
    assert not tower.correct
    assert tower.reason.startswith("math check timed out after 1 s")
    assert tower.format == 1.0
    assert tower.total == pytest.approx(0.1)
    assert {k: r.correct for k, r in by_id.items()} == {
        "m1": True,
        "c": True,
        "n": True,
        "t": False,
        "m2": True,
        "m3": False,
    }
    assert not any(r.timed_out for r in by_id.values())


def test_concurrent_callers_get_their_own_results(verifier: Verifier) -> None:
    def batch(k: int) -> list[ScoreItem]:
        return [
            ScoreItem(think(f"\\boxed{{\\frac{{{k}}}{{2}}}}"), str(k / 2), MATH),
            ScoreItem(think(f"The answer is {k}."), str(k), NUMBER),
            ScoreItem(think(f"\\boxed{{{k + 1}}}"), str(k), NUMBER),
            ScoreItem(think("(A)"), "A" if k % 2 else "B", CHOICE),
        ]

    results: dict[int, list[Reward]] = {}

    def run(k: int) -> None:
        results[k] = verifier.score(batch(k))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(1, 7))
    for k, rewards in results.items():
        assert [r.correct for r in rewards] == [True, True, False, k % 2 == 1], k
