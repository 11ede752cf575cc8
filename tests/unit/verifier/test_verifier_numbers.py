"""Reading one number from an answer (ChartQA, MathVista free-form, counting benchmarks)."""

from __future__ import annotations

import time

import pytest

from axpo_verifier.numbers import ParsedNumber, parse_number, parse_number_ex


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # integers, decimals, signs
        pytest.param("42", 42.0, id="int"),
        pytest.param("  7 ", 7.0, id="int-spaces"),
        pytest.param("-42", -42.0, id="negative"),
        pytest.param("+3", 3.0, id="plus-sign"),
        pytest.param("\u22125", -5.0, id="unicode-minus"),
        pytest.param("\u2013 not a sign", None, id="dash-without-number"),
        pytest.param("1.45", 1.45, id="decimal-mathvista-precision"),
        pytest.param(".5", 0.5, id="leading-dot"),
        pytest.param("-.25", -0.25, id="negative-leading-dot"),
        pytest.param("5.", 5.0, id="trailing-dot"),
        pytest.param("x = -3", -3.0, id="assignment"),
        pytest.param("COVID-19", 19.0, id="hyphen-after-word-is-no-sign"),
        # thousands separators
        pytest.param("1,234,567", 1234567.0, id="thousands"),
        pytest.param("1,234.5", 1234.5, id="thousands-decimal"),
        pytest.param("1,500", 1500.0, id="thousands-not-decimal-comma"),
        pytest.param("1,5", None, id="comma-list-not-decimal"),
        pytest.param("1,50", None, id="bad-grouping"),
        pytest.param("12,34,567", None, id="indian-grouping-unsupported"),
        pytest.param("1, 2, 3", None, id="list"),
        pytest.param("1 234", None, id="space-is-no-separator"),
        pytest.param("1{,}000", 1000.0, id="latex-brace-comma"),
        pytest.param("1\\,000", 1000.0, id="latex-thin-space"),
        pytest.param("1.2.3", None, id="version-string"),
        # scientific notation
        pytest.param("1.2e3", 1200.0, id="e-notation"),
        pytest.param("6.02E23", 6.02e23, id="e-notation-upper"),
        pytest.param("1.2×10^3", 1200.0, id="times-10-caret"),
        pytest.param("1.2 x 10^3", 1200.0, id="x-10-caret"),
        pytest.param("1.2 \\times 10^{3}", 1200.0, id="latex-times"),
        pytest.param("3 \\cdot 10^{-2}", 0.03, id="latex-cdot-negative-exp"),
        pytest.param("10^{6}", 1e6, id="bare-power-of-ten"),
        pytest.param("1.5 million", 1.5e6, id="scale-word"),
        pytest.param("1e999", None, id="overflow"),
        # fractions
        pytest.param("3/4", 0.75, id="slash-fraction"),
        pytest.param("\\frac{3}{4}", 0.75, id="latex-frac"),
        pytest.param("-\\dfrac12", -0.5, id="dfrac-single-digits"),
        pytest.param("\\tfrac{-3}{4}", -0.75, id="tfrac-negative-numerator"),
        pytest.param("1 1/2", 1.5, id="mixed-number"),
        pytest.param("2\\frac{1}{4}", 2.25, id="latex-mixed-number"),
        pytest.param("½", 0.5, id="vulgar-fraction"),
        pytest.param("3/0", None, id="zero-denominator"),
        pytest.param("\\frac{\\sqrt{2}}{2}", None, id="frac-of-sqrt-not-plain"),
        # percent, currency, units, degrees
        pytest.param("45%", 45.0, id="percent"),
        pytest.param("45\\%", 45.0, id="latex-percent"),
        pytest.param("12.5 percent", 12.5, id="percent-word"),
        pytest.param("$1,234.50", 1234.5, id="dollar"),
        pytest.param("-$5", -5.0, id="negative-dollar"),
        pytest.param("€12", 12.0, id="euro"),
        pytest.param("£3.20", 3.2, id="pound"),
        pytest.param("¥100", 100.0, id="yen"),
        pytest.param("USD 5", 5.0, id="currency-code"),
        pytest.param("12 cm", 12.0, id="unit-cm"),
        pytest.param("3.5 kg", 3.5, id="unit-kg"),
        pytest.param("45°", 45.0, id="degree-sign"),
        pytest.param("45^\\circ", 45.0, id="latex-circ"),
        pytest.param("30 degrees", 30.0, id="degrees-word"),
        # LaTeX wrappers
        pytest.param("$\\text{12 cm}$", 12.0, id="math-mode-text"),
        pytest.param("\\mathrm{5}", 5.0, id="mathrm"),
        pytest.param("\\boxed{42}", 42.0, id="boxed"),
        pytest.param("\\(8\\)", 8.0, id="inline-math-parens"),
        # counting benchmarks
        pytest.param("There are 7 apples in the image.", 7.0, id="count-sentence"),
        pytest.param("I count 12 birds", 12.0, id="count-i-count"),
        pytest.param("seven", 7.0, id="word"),
        pytest.param("There are seven apples.", 7.0, id="word-sentence"),
        pytest.param("forty-two", 42.0, id="hyphenated-word"),
        pytest.param("one hundred and five", 105.0, id="words-with-and"),
        pytest.param("nineteen hundred", 1900.0, id="teen-hundred"),
        pytest.param("a dozen", 12.0, id="a-dozen"),
        pytest.param("two dozen eggs", 24.0, id="two-dozen"),
        pytest.param("zero", 0.0, id="zero"),
        pytest.param("minus five", -5.0, id="minus-word"),
        pytest.param("negative 5", -5.0, id="negative-word-digit"),
        pytest.param("7 (seven)", 7.0, id="digits-win-over-words"),
        pytest.param("one two three", None, id="word-list"),
        pytest.param("twenty thirty", None, id="tens-list"),
        pytest.param("The one on the left has three", None, id="two-word-runs"),
        pytest.param("five and a half", None, id="half-not-plain"),
        # not a single plain number
        pytest.param("", None, id="empty"),
        pytest.param("abc", None, id="no-number"),
        pytest.param("3 to 5", None, id="range-words"),
        pytest.param("3-5", None, id="range-hyphen"),
        pytest.param("3:45", None, id="time"),
        pytest.param("2^3", None, id="power-not-plain"),
        pytest.param("\\sqrt{2}", None, id="sqrt"),
        pytest.param("2\\pi", None, id="pi"),
        pytest.param("2π", None, id="unicode-pi"),
        pytest.param("v_1 = 5", None, id="subscript-counts-as-number"),
        pytest.param("inf", None, id="inf"),
        pytest.param("nan", None, id="nan"),
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    got = parse_number(text)
    if value is None:
        assert got is None
    else:
        assert got == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("45%", ParsedNumber(45.0, True), id="sign"),
        pytest.param("45 per cent", ParsedNumber(45.0, True), id="per-cent"),
        pytest.param("forty percent", ParsedNumber(40.0, True), id="word-percent"),
        pytest.param("0.45", ParsedNumber(0.45, False), id="no-percent"),
    ],
)
def test_parse_number_percent_flag(text: str, expected: ParsedNumber) -> None:
    assert parse_number_ex(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("1 " * 500_000, id="1MB-numbers"),
        pytest.param("9" * 1_000_000, id="1MB-digits"),
        pytest.param("1," * 500_000, id="1MB-commas"),
        pytest.param("\\frac{" * 100_000, id="unclosed-fracs"),
        pytest.param("one " * 250_000, id="1MB-words"),
        pytest.param("-" * 1_000_000 + "5", id="1MB-minus"),
        pytest.param("1" + " " * 1_000_000 + "x 10^3", id="1MB-spaces"),
    ],
)
def test_parse_number_is_linear(text: str) -> None:
    start = time.perf_counter()
    parse_number(text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("text", "value"),
    [
        pytest.param("1,5", 1.5, id="one-digit"),
        pytest.param("1,22", 1.22, id="two-digits"),
        pytest.param("1000,99", 1000.99, id="four-before"),
        pytest.param("-0,5 m", -0.5, id="negative-with-unit"),
        pytest.param("1,234", 1234.0, id="three-digits-stay-thousands"),
        pytest.param("1,234,5", None, id="mixed-groups-malformed"),
        pytest.param("1,5 and 2,5", None, id="two-numbers"),
        pytest.param("1, 5", None, id="space-is-a-list"),
    ],
)
def test_decimal_comma_when_asked(text: str, value: float | None) -> None:
    parsed = parse_number_ex(text, decimal_comma=True)
    assert (parsed.value if parsed is not None else None) == value


def test_no_decimal_comma_unless_asked() -> None:
    assert parse_number("1,22") is None
    assert parse_number("1000,99") is None
