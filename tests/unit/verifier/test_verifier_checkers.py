"""Choice, number and text checkers, with answers written the way benchmark models write them."""

from __future__ import annotations

import time

import pytest

from axpo_verifier.checkers import Verdict, check_choice, check_number, check_text

# MathVista-style options (plain texts; the gold may be the text itself).
MATHVISTA = ("3/11", "8/11", "6/11", "3/5")
# HR-Bench / V*-style options, some carrying their own "(A)" label.
VSTAR = ("(A) red", "(B) blue", "(C) white", "(D) black")
APPLES = ("17 apples", "42 apples", "5 apples", "none")
COUNTS = ("3", "5", "7", "9")


@pytest.mark.parametrize(
    ("answer", "gold", "choices", "correct"),
    [
        # letter forms
        pytest.param("B", "B", (), True, id="bare-letter"),
        pytest.param("(B)", "B", (), True, id="parenthesized"),
        pytest.param("[B]", "B", (), True, id="bracketed"),
        pytest.param("B.", "B", (), True, id="letter-period"),
        pytest.param("B)", "B", (), True, id="letter-paren"),
        pytest.param("B:", "B", (), True, id="letter-colon"),
        pytest.param("b", "B", (), True, id="lower-case"),
        pytest.param("Option B", "B", (), True, id="option-b"),
        pytest.param("option (b)", "B", (), True, id="option-paren-lower"),
        pytest.param("Choice C", "C", (), True, id="choice-c"),
        pytest.param("The answer is B", "B", (), True, id="answer-is-b"),
        pytest.param("The correct option is (C).", "C", (), True, id="correct-option-is"),
        pytest.param("**B**", "B", (), True, id="markdown-bold"),
        pytest.param("$\\text{(B)}$", "B", (), True, id="latex-text"),
        pytest.param("B", "(B)", (), True, id="gold-parenthesized"),
        pytest.param("C", "C", (), True, id="letter-c"),
        pytest.param("A", "A", COUNTS, True, id="lone-a-is-a-letter"),
        # letter followed by the option text
        pytest.param("B. 42 apples", "B", APPLES, True, id="letter-and-text"),
        pytest.param("(B) 42 apples", "B", APPLES, True, id="paren-letter-and-text"),
        pytest.param("b) 42 apples", "B", APPLES, True, id="lower-letter-and-text"),
        pytest.param("B. 17 apples", "B", APPLES, False, id="letter-with-other-options-text"),
        # option text itself
        pytest.param("42 apples", "B", APPLES, True, id="option-text"),
        pytest.param("42 Apples.", "B", APPLES, True, id="option-text-normalized"),
        pytest.param("8/11", "8/11", MATHVISTA, True, id="mathvista-text-gold-text-answer"),
        pytest.param("B", "8/11", MATHVISTA, True, id="mathvista-text-gold-letter-answer"),
        pytest.param("(B) 8/11", "8/11", MATHVISTA, True, id="mathvista-letter-and-text"),
        pytest.param("6/11", "8/11", MATHVISTA, False, id="mathvista-wrong-text"),
        pytest.param("blue", "B", VSTAR, True, id="vstar-option-text-own-labels"),
        pytest.param("(B)", "B", VSTAR, True, id="vstar-letter"),
        pytest.param("(C)", "B", VSTAR, False, id="vstar-wrong-letter"),
        pytest.param("There are 7", "C", COUNTS, True, id="number-matches-one-option"),
        # explicit markers and bare letters in prose
        pytest.param("I think the answer is C", "C", (), True, id="answer-is-in-prose"),
        pytest.param("I would pick B", "B", (), True, id="pronoun-i-is-not-option-i"),
        pytest.param("A is correct", "A", (), True, id="a-is-letter-before-verb"),
        pytest.param("A cat", "A", (), False, id="article-a-is-not-option"),
        pytest.param("A cat is on the mat", "A", (), False, id="article-a-in-sentence"),
        pytest.param("f(x) grows, so D", "D", (), True, id="function-parens-not-marker"),
        # wrong answers
        pytest.param("C", "B", (), False, id="wrong-letter"),
        pytest.param("E", "B", COUNTS, False, id="letter-out-of-range"),
        pytest.param("no idea", "B", (), False, id="no-letter"),
        pytest.param("", "B", (), False, id="empty"),
        # answers naming two or more options are wrong
        pytest.param("A or B", "B", (), False, id="a-or-b"),
        pytest.param("A, C", "A", (), False, id="a-comma-c"),
        pytest.param("B and D", "B", (), False, id="b-and-d"),
        pytest.param("A/B", "A", (), False, id="a-slash-b"),
        pytest.param("(A) or (B)", "A", (), False, id="two-parenthesized"),
        pytest.param("Option A or option B", "A", (), False, id="two-options"),
        pytest.param("B. 42 apples or (C) 5 apples", "B", APPLES, False, id="two-letters-text"),
    ],
)
def test_check_choice(answer: str, gold: str, choices: tuple[str, ...], correct: bool) -> None:
    verdict = check_choice(answer, gold, choices)
    assert verdict.correct is correct, verdict.reason


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        pytest.param("A or B", "several options (A, B)", id="several"),
        pytest.param("nothing", "no option found", id="none-found"),
        pytest.param("C", "choice C != gold B", id="wrong"),
        pytest.param("(B)", "choice B == gold B", id="right"),
    ],
)
def test_check_choice_reasons(answer: str, fragment: str) -> None:
    assert fragment in check_choice(answer, "B").reason


def test_check_choice_gold_not_an_option() -> None:
    verdict = check_choice("A", "purple", VSTAR)
    assert not verdict.correct
    assert "neither a letter nor an option" in verdict.reason


def test_check_choice_without_choices_and_text_gold_compares_text() -> None:
    assert check_choice("The red car", "red car").correct


@pytest.mark.parametrize(
    ("answer", "gold", "rel_tol", "abs_tol", "correct"),
    [
        # MathVista free-form: integers and floats with given precision
        pytest.param("5", "5", 0.0, 0.0, True, id="mathvista-int"),
        pytest.param("1.45", "1.45", 0.0, 1e-9, True, id="mathvista-float"),
        pytest.param("1.4", "1.45", 0.0, 1e-9, False, id="mathvista-float-precision"),
        pytest.param("6", "5", 0.0, 0.0, False, id="wrong-int"),
        # ChartQA relaxed accuracy: 5 % relative tolerance
        pytest.param("17.8", "17.6", 0.05, 0.0, True, id="chartqa-within-5pct"),
        pytest.param("19", "17.6", 0.05, 0.0, False, id="chartqa-outside-5pct"),
        pytest.param("45%", "45", 0.05, 0.0, True, id="chartqa-percent-vs-number"),
        pytest.param("45%", "0.45", 0.05, 0.0, True, id="chartqa-percent-vs-fraction"),
        pytest.param("0.45", "45%", 0.05, 0.0, True, id="fraction-vs-percent-gold"),
        pytest.param("45%", "45%", 0.05, 0.0, True, id="percent-both"),
        pytest.param("0.45", "45", 0.05, 0.0, False, id="no-percent-sign-no-factor-100"),
        pytest.param("57%", "0.6", 0.05, 0.0, True, id="chartqa-percent-fraction-tolerance"),
        pytest.param("$1,234", "1234", 0.0, 0.0, True, id="currency-thousands"),
        pytest.param("2.1 million", "2100000", 0.01, 0.0, True, id="scale-word"),
        # counting benchmarks
        pytest.param("There are 7 apples.", "7", 0.0, 0.0, True, id="count-sentence"),
        pytest.param("seven", "7", 0.0, 0.0, True, id="count-word"),
        pytest.param("There are eight apples.", "7", 0.0, 0.0, False, id="count-word-wrong"),
        pytest.param("a dozen", "12", 0.0, 0.0, True, id="count-dozen"),
        # tolerance arithmetic
        pytest.param("0.3", "0", 0.5, 0.0, False, id="zero-gold-needs-abs-tol"),
        pytest.param("0.3", "0", 0.5, 0.5, True, id="zero-gold-abs-tol"),
        pytest.param("-2", "2", 0.5, 0.0, False, id="sign-matters"),
        pytest.param("\\frac{1}{3}", "0.3333", 0.001, 0.0, True, id="latex-fraction"),
        pytest.param("30°", "30", 0.0, 0.0, True, id="degrees"),
        # no number
        pytest.param("I cannot tell", "7", 0.05, 0.0, False, id="no-number"),
        pytest.param("3 or 4", "3", 0.05, 0.0, False, id="two-numbers"),
    ],
)
def test_check_number(
    answer: str, gold: str, rel_tol: float, abs_tol: float, correct: bool
) -> None:
    verdict = check_number(answer, gold, rel_tol, abs_tol)
    assert verdict.correct is correct, verdict.reason


def test_check_number_reason_and_normalized() -> None:
    assert check_number("42", "42", 0.01, 0.0) == Verdict(
        True, "number 42 == gold 42 (rel_tol 0.01, abs_tol 0)", "42"
    )
    assert "is not a single number" in check_number("4", "four or five", 0.01, 0.0).reason


@pytest.mark.parametrize(
    ("answer", "gold", "correct"),
    [
        pytest.param("Paris", "paris", True, id="case"),
        pytest.param("  Paris. ", "Paris", True, id="punctuation-whitespace"),
        pytest.param("The Eiffel Tower", "Eiffel Tower", True, id="leading-article"),
        pytest.param("a red car", "the red car", True, id="articles-both"),
        pytest.param("**Mount   Everest**", "mount everest", True, id="markdown-spaces"),
        pytest.param("ｐａｒｉｓ", "paris", True, id="nfkc-fullwidth"),
        pytest.param("\\text{blue}", "blue", True, id="latex-text"),
        pytest.param("3.0", "3", True, id="plain-numbers"),
        pytest.param("New-York", "new york", True, id="hyphen"),
        pytest.param("green", "blue", False, id="wrong"),
        pytest.param("the car", "the red car", False, id="missing-word"),
        pytest.param("Paris, France", "Paris", False, id="extra-words"),
        pytest.param("", "blue", False, id="empty-answer"),
        pytest.param("blue", "", False, id="empty-gold"),
    ],
)
def test_check_text(answer: str, gold: str, correct: bool) -> None:
    verdict = check_text(answer, gold)
    assert verdict.correct is correct, verdict.reason


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param("option " + " " * 1_000_000 + "x", id="option-then-spaces"),
        pytest.param("A " * 500_000, id="many-articles"),
        pytest.param("A or " * 200_000, id="many-or"),
        pytest.param("(" * 1_000_000, id="open-parens"),
        pytest.param("answer is " * 100_000, id="answer-is-repeated"),
    ],
)
def test_checkers_are_linear(answer: str) -> None:
    start = time.perf_counter()
    check_choice(answer, "B", APPLES)
    check_text(answer, "B")
    check_number(answer, "5", 0.01, 0.0)
    assert time.perf_counter() - start < 2.0
