"""Property tests: for random numbers and tuples rendered in every supported answer shape, the
verifier agrees with the gold; for a perturbed gold it disagrees."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axpo.contracts.domain import AnswerKind, ScoreItem

# Where a number can stand in an output ({} is the rendered number).
NUMBER_SHAPES = (
    "{}",
    "The answer is {}.",
    "<think>Adding them up.</think>\n\nThe answer is {}.",
    "\\boxed{{{}}}",
    "So the total is $\\boxed{{{}}}$.",
    "<answer>{}</answer>",
    "Final Answer: The result is {}.",
    "The answer\n\\[\n{}\n\\]",
    "We get\n$$\n{}\n$$",
    "First $\\boxed{{3}}$ per row. The final answer is {}",
    "{}<|im_end|>\n<|im_start|>user\nthanks",
    "Answer: {}<|endoftext|>5",
)


def _plain(value: Decimal) -> str:
    return format(value, "f")


def _thousands(value: Decimal) -> str:
    whole, _, frac = format(value, "f").partition(".")
    sign = "-" if whole.startswith("-") else ""
    grouped = f"{int(whole.lstrip('-')):,}"
    return sign + grouped + (f".{frac}" if frac else "")


def _decimal_comma(value: Decimal) -> str:
    return format(value, "f").replace(".", ",")


numbers = st.one_of(
    st.integers(-2_000_000, 2_000_000).map(Decimal),
    st.integers(-99_999, 99_999).map(lambda n: Decimal(n) / 100),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=numbers, shape=st.sampled_from(NUMBER_SHAPES), style=st.integers(0, 2))
def test_numbers_in_every_shape(verifier, value, shape, style):
    if style == 1:
        text = _thousands(value)
    elif style == 2 and value != value.to_integral_value():
        text = _decimal_comma(value)  # a non-integer gold admits the decimal comma
    else:
        text = _plain(value)
    output = shape.format(text)
    gold = _plain(value)
    perturbed = _plain(value + abs(value) / 10 + 1)  # 9 % or more away from value
    right, wrong = verifier.score(
        [
            ScoreItem(output, gold, AnswerKind.NUMBER),
            ScoreItem(output, perturbed, AnswerKind.NUMBER),
        ]
    )
    assert right.correct, (output, gold, right.reason)
    assert not wrong.correct, (output, perturbed, wrong.reason)


SEPARATORS = (", ", ",", " \\quad \\text{and} \\quad ", "$, $", " and ", "; ")
pairs = st.lists(
    st.tuples(st.integers(-9, 9), st.integers(-9, 9)), min_size=2, max_size=4, unique=True
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(points=pairs, sep=st.sampled_from(SEPARATORS), which=st.integers(0, 3))
def test_tuples_in_several_boxes(verifier, points, sep, which):
    boxes = sep.join(f"\\boxed{{({a}, {b})}}" for a, b in points)
    output = f"The solutions are ${boxes}$."
    gold = ", ".join(f"({a}, {b})" for a, b in points)
    i = which % len(points)
    changed = [*points[:i], (points[i][0], points[i][1] + 10), *points[i + 1 :]]
    perturbed = ", ".join(f"({a}, {b})" for a, b in changed)
    right, wrong = verifier.score(
        [ScoreItem(output, gold, AnswerKind.MATH), ScoreItem(output, perturbed, AnswerKind.MATH)]
    )
    assert right.correct, (output, gold, right.reason)
    assert not wrong.correct, (output, perturbed, wrong.reason)
