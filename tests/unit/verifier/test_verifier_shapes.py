"""The answer shapes real models write (issue: reward and tool-call parsing on real outputs),
one row each, scored end to end by the verifier. Every accepted shape comes with the near-miss
that must stay wrong: the reward is never fooled into scoring a wrong answer right."""

from __future__ import annotations

import pytest

from axpo.contracts.domain import AnswerKind, ScoreItem
from axpo.settings.verifier import VerifierSettings
from axpo_verifier.verifier import Verifier

NUMBER, MATH = AnswerKind.NUMBER, AnswerKind.MATH

# (source shape, kind, output, gold, correct)
SHAPES = [
    # Several \boxed{} answers that together form the answer.
    (
        "boxes: two pairs joined by \\quad \\text{and}",
        MATH,
        r"So $\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$.",
        "(2, 2), (6, 2)",
        True,
    ),
    ("boxes: singletons against a set", MATH, r"\boxed{1},\boxed{2},\boxed{3}", r"\{1,2,3\}", True),
    (
        "boxes: four pairs against a list",
        MATH,
        r"The pairs are \boxed{(1,2)}, \boxed{(2,1)}, \boxed{(3,4)}, \boxed{(4,3)}",
        "(1,2), (2,1), (3,4), (4,3)",
        True,
    ),
    ("boxes: each in its own $...$", MATH, r"$\boxed{1}$ and $\boxed{2}$", r"\{1, 2\}", True),
    (
        "near-miss boxes: a different pair",
        MATH,
        r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 3)}",
        "(2, 2), (6, 2)",
        False,
    ),
    (
        "near-miss boxes: a truncated list",
        MATH,
        r"\boxed{(1,2)}, \boxed{(2,1)}, \boxed{(3,4)}",
        "(1,2), (2,1), (3,4), (4,3)",
        False,
    ),
    (
        "near-miss boxes: prose between boxes, the last one counts",
        MATH,
        r"First \boxed{3}. After checking the cases again it is \boxed{5}",
        r"\{3, 5\}",
        False,
    ),
    # Display math over several lines at the end.
    ("display math \\[ \\] over lines", NUMBER, "The answer\n\\[\n9\n\\]", "9", True),
    ("display math $$ $$ over lines", NUMBER, "So we get\n$$\n9\n$$", "9", True),
    ("display math over lines, math", MATH, "Hence\n\\[\n\\frac{3}{4}\n\\]", "0.75", True),
    ("near-miss display math: another number", NUMBER, "The answer\n\\[\n8\n\\]", "9", False),
    # Template leftovers after the model's turn.
    (
        "leftover <|im_start|>user after a bare answer",
        NUMBER,
        "12<|im_end|>\n<|im_start|>user",
        "12",
        True,
    ),
    (
        "leftover user turn after a box",
        MATH,
        "\\boxed{12}<|im_end|>\n<|im_start|>user\nThanks! Now 13?",
        "12",
        True,
    ),
    ("leftover <|endoftext|> and noise", NUMBER, "The answer is 7.<|endoftext|>8 9", "7", True),
    (
        "near-miss leftover: the answer only in the next user turn",
        NUMBER,
        "I am not sure.<|im_end|>\n<|im_start|>user\nThe answer is 12",
        "12",
        False,
    ),
    (
        "transcript: tool call, tool response, then the answer",
        NUMBER,
        '<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>ok</think>The answer is 42.<|im_end|>",
        "42",
        True,
    ),
    # An intermediate box before a stated final answer.
    (
        "intermediate box, then the stated final answer",
        NUMBER,
        "First $\\boxed{255}$ per crate, 41 crates. The final answer is $10,455$",
        "10455",
        True,
    ),
    (
        "near-miss intermediate box: the stated answer is wrong",
        NUMBER,
        "First $\\boxed{255}$. The final answer is $11,455$",
        "10455",
        False,
    ),
    (
        "stated answer before the box: the box wins",
        NUMBER,
        "The final answer is below.\n$\\boxed{36}$",
        "36",
        True,
    ),
    (
        "near-miss: a box inside the thinking",
        NUMBER,
        "<think>\\boxed{7}</think>I do not know.",
        "7",
        False,
    ),
    # "Final Answer:" followed by a sentence.
    (
        "Final Answer: a sentence with the number",
        NUMBER,
        "Final Answer: The total number of apples is 42.",
        "42",
        True,
    ),
    (
        "Final Answer: a sentence with inline math",
        MATH,
        "Final Answer: The value of $x$ is $\\frac{3}{4}$.",
        "\\frac{3}{4}",
        True,
    ),
    (
        "near-miss Final Answer: two numbers in the sentence",
        NUMBER,
        "Final Answer: 40 or 42 apples.",
        "42",
        False,
    ),
    # Decimal commas (a non-integer gold admits one or two digits after the comma).
    ("decimal comma 1000,99", NUMBER, "The price is 1000,99", "1000.99", True),
    ("decimal comma 1,22", NUMBER, "1,22", "1.22", True),
    ("decimal comma 0,5 in a sentence", NUMBER, "The answer is 0,5.", "0.5", True),
    ("near-miss decimal comma: 1,234 is thousands, gold 1.234", NUMBER, "1,234", "1.234", False),
    ("thousands 1,234 against 1234", NUMBER, "1,234", "1234", True),
    ("near-miss decimal comma: 1,22 against the integer 122", NUMBER, "1,22", "122", False),
    ("near-miss decimal comma: 1,5 against 15", NUMBER, "1,5", "15", False),
    # Relations compared with sets (VerifierSettings.math_set_relation, default on).
    ("relation as a set: -2 \\le x \\le 7", MATH, r"\boxed{-2 \le x \le 7}", r"x \in [-2,7]", True),
    ("near-miss relation: an open end", MATH, r"\boxed{-2 < x \le 7}", r"x \in [-2,7]", False),
    # A tool call in the middle of text: the text on both sides stays visible.
    (
        "tool call between text: the answer after it",
        NUMBER,
        'Let me check. <tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call> '
        "Anyway, the answer is 5.",
        "5",
        True,
    ),
    (
        "tool call between text: the answer before it",
        NUMBER,
        'The answer is 5. <tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>',
        "5",
        True,
    ),
]


@pytest.mark.parametrize(
    ("shape", "kind", "output", "gold", "correct"), SHAPES, ids=[s[0] for s in SHAPES]
)
def test_answer_shapes(verifier, shape, kind, output, gold, correct):
    (reward,) = verifier.score([ScoreItem(output, gold, kind)])
    assert reward.correct is correct, f"{shape}: {reward.extracted!r}: {reward.reason}"


def test_relation_as_set_is_a_setting():
    item = ScoreItem(r"\boxed{-2 \le x \le 7}", r"x \in [-2,7]", MATH)
    with Verifier(VerifierSettings(math_workers=1, math_set_relation=False)) as strict:
        (reward,) = strict.score([item])
    assert not reward.correct


def test_float_rounding_is_a_setting(verifier):
    item = ScoreItem(r"\boxed{0.33}", r"\frac{1}{3}", MATH)
    (default,) = verifier.score([item])
    assert not default.correct  # 6 decimal places by default
    with Verifier(VerifierSettings(math_workers=1, math_float_rounding=2)) as loose:
        (reward,) = loose.score([item])
    assert reward.correct
