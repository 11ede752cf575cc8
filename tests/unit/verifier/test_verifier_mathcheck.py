"""MathChecker: math-verify in killable workers (MATH-style LaTeX answers)."""

from __future__ import annotations

import time

import pytest

from axpo_verifier.mathcheck import MathChecker, check_math_in_process, normalize_math
from axpo_verifier.verifier import Verifier

TOWER = "2^{2^{2^{2^{2^{2^{2^{2}}}}}}}"


@pytest.mark.parametrize(
    ("answer", "gold", "correct"),
    [
        pytest.param("\\frac{1}{2}", "0.5", True, id="frac-vs-decimal"),
        pytest.param("x^2+2x+1", "(x+1)^2", True, id="expanded-square"),
        pytest.param("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True, id="sqrt-forms"),
        pytest.param("\\dfrac{3}{4}", "0.75", True, id="dfrac"),
        pytest.param("[1,2)", "[1, 2)", True, id="interval-spacing"),
        pytest.param("(1,2]", "[1,2)", False, id="interval-open-closed-differ"),
        pytest.param("(-\\infty, 3]", "x \\le 3", True, id="interval-vs-inequality"),
        pytest.param("\\{1,2,3\\}", "\\{3,2,1\\}", True, id="set-order"),
        pytest.param("\\{1,2\\}", "\\{1,2,3\\}", False, id="set-missing-element"),
        pytest.param("2\\pi", "\\pi \\cdot 2", True, id="pi-product"),
        pytest.param("\\pi", "2\\pi", False, id="pi-wrong"),
        pytest.param("x = 3", "3", True, id="assignment-vs-value"),
        pytest.param("$\\frac12$", "\\frac{1}{2}", True, id="dollar-delimited"),
        pytest.param("The value is $\\frac{3}{4}$ meters", "0.75", True, id="prose-with-math"),
        pytest.param("\\frac{3}{4}", "0.7", False, id="close-but-wrong"),
        pytest.param("50\\%", "0.5", True, id="percent"),
        pytest.param("1", "2", False, id="wrong-number"),
        pytest.param("\\text{(B)}", "B", True, id="text-letter"),
        pytest.param("\\frac{\\pi}{4}", "45^\\circ", False, id="radians-vs-degrees"),
        pytest.param("", "1", False, id="empty-answer"),
    ],
)
def test_math_pairs(verifier: Verifier, answer: str, gold: str, correct: bool) -> None:
    verdict = verifier.math_checker.submit(answer, gold, timeout_s=10.0).result(timeout=30)
    assert verdict.correct is correct, verdict.reason


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        pytest.param("\\frac{1}{2}", "\\frac{1}{2}", id="identical"),
        pytest.param("$\\left( 1, 2 \\right)$", "(1,2)", id="left-right-spacing"),
        pytest.param("\\dfrac{1}{2}.", "\\frac{1}{2}", id="dfrac-trailing-period"),
    ],
)
def test_fast_path_needs_no_worker(verifier: Verifier, answer: str, gold: str) -> None:
    assert normalize_math(answer) == normalize_math(gold)
    future = verifier.math_checker.submit(answer, gold, timeout_s=1.0)
    assert future.done()
    assert future.result().correct


def test_too_long_answer_is_refused_without_worker(verifier: Verifier) -> None:
    future = verifier.math_checker.submit("1+" * 10_000 + "1", "1", timeout_s=1.0)
    assert future.done()
    assert not future.result().correct
    assert "too long" in future.result().reason


def test_hostile_tower_times_out_and_pool_recovers(verifier: Verifier) -> None:
    start = time.monotonic()
    future = verifier.math_checker.submit(TOWER, "4", timeout_s=1.0)
    with pytest.raises(TimeoutError):
        future.result(timeout=10)
    assert time.monotonic() - start < 1.0 + 3.0
    # the killed worker is replaced; the next check works
    after = verifier.math_checker.submit("\\frac{2}{4}", "0.5", timeout_s=10.0)
    assert after.result(timeout=30).correct


def test_check_math_in_process_directly() -> None:
    assert check_math_in_process("\\frac{1}{2}", "0.5").correct
    assert not check_math_in_process("\\frac{1}{3}", "0.5").correct


def test_own_pool_context_manager_and_close() -> None:
    with MathChecker(workers=1) as checker:
        assert checker.wait_ready(60)
        assert checker.submit("2+2", "4", timeout_s=10.0).result(timeout=30).correct
    checker.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        checker.submit("1", "2", timeout_s=1.0)


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MathChecker(workers=0)
