"""Answer extraction from Qwen3-VL-Thinking style outputs."""

from __future__ import annotations

import time

import pytest

from axpo_verifier.extract import (
    Extraction,
    drop_run_past,
    extract_answer,
    split_thinking,
    strip_tool_blocks,
)

TOOL_CALL = '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox": [0, 0, 10, 10]}}\n</tool_call>'


@pytest.mark.parametrize(
    ("output", "thinking", "visible"),
    [
        pytest.param("<think>hmm</think>\n\n42", "hmm", "\n\n42", id="both-tags"),
        pytest.param("hmm</think>\n\n42", "hmm", "\n\n42", id="missing-open-think"),
        pytest.param("no tags at all", "", "no tags at all", id="no-tags"),
        pytest.param("<think>never closed 42", "never closed 42", "", id="unclosed-think"),
        pytest.param("<think>a</think>b</think>c", "a\nb", "c", id="stray-close-makes-thinking"),
        pytest.param("<think>a<think>b</think>c", "a<think>b", "c", id="nested-open-is-text"),
        pytest.param(
            "<think>a</think>x<think>b</think>y", "a\nb", "x\ny", id="two-turns-both-visible"
        ),
        pytest.param("", "", "", id="empty"),
    ],
)
def test_split_thinking(output: str, thinking: str, visible: str) -> None:
    assert split_thinking(output) == (thinking, visible)


def test_strip_tool_blocks_removes_calls_responses_and_special_tokens() -> None:
    text = f"before\n{TOOL_CALL}\n<tool_response>img</tool_response><|im_end|>after"
    stripped = strip_tool_blocks(text)
    assert "zoom_in" not in stripped
    assert "img" not in stripped
    assert "<|im_end|>" not in stripped
    assert stripped.startswith("before")
    assert stripped.endswith("after")


@pytest.mark.parametrize(
    ("output", "text", "source"),
    [
        # --- think stripping
        pytest.param("<think>It is 3.</think>\n\n4", "4", "last_line", id="think-stripped"),
        pytest.param(
            "The answer is 3, I guess</think>\n\nThe answer is 4.",
            "4",
            "answer_is",
            id="missing-open-think-ignored",
        ),
        pytest.param(
            "<think>\\boxed{1}</think> So \\boxed{2}.", "2", "boxed", id="boxed-in-think-ignored"
        ),
        pytest.param("<think>only thinking, truncated", None, None, id="unclosed-think-none"),
        pytest.param(
            "<think><answer>7</answer></think>\nIt is 8",
            "It is 8",
            "last_line",
            id="answer-tag-inside-think-ignored",
        ),
        # --- <answer> tags
        pytest.param("<think>x</think><answer>B</answer>", "B", "answer_tag", id="answer-tag"),
        pytest.param(
            "<think>x</think><answer>3</answer> wait <answer>5</answer>",
            "5",
            "answer_tag",
            id="last-answer-tag-wins",
        ),
        pytest.param(
            "<think>x</think>\\boxed{9} <answer> 12 </answer>",
            "12",
            "answer_tag",
            id="answer-tag-beats-boxed",
        ),
        pytest.param(
            "<think>x</think><answer>$\\boxed{\\frac{1}{2}}$</answer>",
            "\\frac{1}{2}",
            "answer_tag",
            id="boxed-inside-answer-tag-unwrapped",
        ),
        pytest.param(
            "<think>x</think><answer>42", "42", "answer_tag", id="unclosed-answer-tag-runs-to-end"
        ),
        pytest.param(
            "<think>x</think><answer>**C**.</answer>", "C", "answer_tag", id="answer-tag-bold"
        ),
        # --- \boxed{}
        pytest.param(
            "<think>x</think>So the area is $\\boxed{12}$ square units.", "12", "boxed", id="boxed"
        ),
        pytest.param(
            "\\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}}",
            "\\frac{\\sqrt{3}}{2}",
            "boxed",
            id="last-boxed-nested-braces",
        ),
        pytest.param("\\fbox{7}", "7", "boxed", id="fbox"),
        pytest.param("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed", id="escaped-braces-in-boxed"),
        pytest.param("\\boxed 5 is it", "5", "boxed", id="boxed-without-braces"),
        pytest.param("\\boxed{3} and \\boxed{4", "3", "boxed", id="unclosed-last-boxed-falls-back"),
        pytest.param(
            "\\boxed{(-\\infty, 2]}", "(-\\infty, 2]", "boxed", id="boxed-interval-brackets"
        ),
        pytest.param("The final answer is \\boxed{B}.", "B", "boxed", id="boxed-beats-answer-is"),
        # --- "the answer is"
        pytest.param("Thus, the answer is 42.", "42", "answer_is", id="the-answer-is"),
        pytest.param("THE ANSWER IS (C)", "(C)", "answer_is", id="answer-is-upper-case"),
        pytest.param("Answer: B", "B", "answer_is", id="answer-colon"),
        pytest.param("Final answer: 3.14", "3.14", "answer_is", id="final-answer-colon"),
        pytest.param("**Final Answer:** 17", "17", "answer_is", id="markdown-bold-lead-in"),
        pytest.param("The answer is **7**.", "7", "answer_is", id="markdown-bold-answer"),
        pytest.param("**Answer**: seven", "seven", "answer_is", id="bold-answer-label"),
        pytest.param("**Final Answer**\n\n12 cm", "12 cm", "answer_is", id="heading-next-line"),
        pytest.param(
            "The answer is 5. Then I double-checked it.", "5", "answer_is", id="cut-at-sentence"
        ),
        pytest.param(
            "The answer is B. 42 apples", "B. 42 apples", "answer_is", id="letter-and-text-kept"
        ),
        pytest.param(
            "Answer: 3\nWait, no. The answer is 4.", "4", "answer_is", id="last-answer-is-wins"
        ),
        pytest.param("the correct answer is: Paris", "Paris", "answer_is", id="answer-is-colon"),
        # --- last line
        pytest.param(
            "Counting them...\nThere are 7 apples.",
            "There are 7 apples",
            "last_line",
            id="last-line-count",
        ),
        pytest.param("first\n\nsecond\n\n   \n", "second", "last_line", id="trailing-blank-lines"),
        # --- tool calls are not answers
        pytest.param(
            f"<think>zoom</think>\n{TOOL_CALL}", None, None, id="tool-call-only-is-no-answer"
        ),
        pytest.param(
            f"<think>zoom</think>\n{TOOL_CALL}\nThe answer is 3.",
            "3",
            "answer_is",
            id="tool-call-then-answer",
        ),
        pytest.param(
            f"<think>x</think>It is 6\n{TOOL_CALL}",
            "It is 6",
            "last_line",
            id="text-before-trailing-tool-call",
        ),
        pytest.param(
            '<think>x</think>ok<tool_call>{"name": "answer: 9"',
            "ok",
            "last_line",
            id="unclosed-tool-call-stripped",
        ),
        # --- control characters and emptiness
        pytest.param("The answer is 4\x002", "42", "answer_is", id="nul-byte-dropped"),
        pytest.param("\x1b\x07Answer:\u200b 5\r\n", "5", "answer_is", id="controls-zero-width"),
        pytest.param("", None, None, id="empty"),
        pytest.param(" \n\t ", None, None, id="whitespace"),
        pytest.param("\x00\x00\x00", None, None, id="only-nul"),
    ],
)
def test_extract_answer(output: str, text: str | None, source: str | None) -> None:
    got = extract_answer(output)
    if text is None:
        assert got is None
    else:
        assert got == Extraction(text, source)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "output",
    [
        pytest.param("word " * 200_000, id="1MB-words"),
        pytest.param("\\boxed{" + "{" * 5000 + "x" + "}" * 5000 + "}", id="5000-nested-braces"),
        pytest.param("\\boxed{" * 100_000, id="100k-unclosed-boxed"),
        pytest.param("\\boxed{" + "{" * 500_000, id="500k-open-braces"),
        pytest.param("answer: " * 100_000, id="100k-answer-colons"),
        pytest.param("<think>" * 100_000 + "</think>" * 100_000, id="100k-think-tags"),
        pytest.param("<answer>" * 100_000, id="100k-answer-tags"),
        pytest.param("<tool_call>" * 100_000 + "x", id="100k-open-tool-calls"),
        pytest.param("The answer is " + "." * 1_000_000, id="1MB-periods"),
        pytest.param("*" * 1_000_000, id="1MB-asterisks"),
        pytest.param("\\\\" * 500_000 + "{}", id="1MB-backslashes"),
    ],
)
def test_extract_is_linear_on_hostile_input(output: str) -> None:
    start = time.perf_counter()
    extract_answer(output)
    assert time.perf_counter() - start < 1.0


def test_5000_nested_braces_extracted_whole() -> None:
    inner = "{" * 5000 + "x" + "}" * 5000
    got = extract_answer("\\boxed{" + inner + "}")
    assert got is not None
    assert got.text == inner
    assert got.source == "boxed"


@pytest.mark.parametrize(
    ("output", "turn"),
    [
        pytest.param("42<|im_end|>\n<|im_start|>user\nmore", "42", id="runs-into-user"),
        pytest.param("42<|endoftext|>junk", "42", id="endoftext"),
        pytest.param("42<|im_end|>", "42", id="own-im-end"),
        pytest.param("42<|im_end|>\ntrailing", "42", id="after-im-end"),
        pytest.param(
            "a<|im_end|>\n<|im_start|>user\nr<|im_end|>\n<|im_start|>assistant\nb<|im_end|>",
            "a<|im_end|>\n<|im_start|>user\nr<|im_end|>\n<|im_start|>assistant\nb",
            id="transcript-keeps-earlier-turns",
        ),
        pytest.param("plain 42", "plain 42", id="nothing-to-drop"),
    ],
)
def test_drop_run_past(output: str, turn: str) -> None:
    assert drop_run_past(output) == turn


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        pytest.param(r"\boxed{1}, \boxed{2}", Extraction("1, 2", "boxed"), id="two-boxes"),
        pytest.param(
            r"$\boxed{a}$ \quad \text{and} \quad $\boxed{b}$",
            Extraction("a, b", "boxed"),
            id="quad",
        ),
        pytest.param(r"\boxed{1} so \boxed{2}", Extraction("2", "boxed"), id="prose-breaks-run"),
        pytest.param(
            r"\boxed{5}. Thus the final answer is 6",
            Extraction("6", "answer_is"),
            id="stated-after",
        ),
        pytest.param(
            r"The answer is \boxed{6}.", Extraction("6", "boxed"), id="stated-before-box-wins"
        ),
        pytest.param(
            "x\n\\[\n 3 + 4\n = 7\n\\]", Extraction("3 + 4 = 7", "last_line"), id="display"
        ),
        pytest.param("x\n$$\n7\n$$.", Extraction("7", "last_line"), id="display-dollars-period"),
        pytest.param(
            "so \\[ 7 \\]", Extraction("so \\[ 7 \\]", "last_line"), id="one-line-display"
        ),
    ],
)
def test_new_extraction_rules(output: str, expected: Extraction) -> None:
    assert extract_answer(output) == expected


def test_box_runs_stay_linear() -> None:
    output = ", ".join(["\\boxed{1}"] * 50_000)
    started = time.perf_counter()
    found = extract_answer(output)
    assert found is not None
    assert found.text.count("1") == 64  # at most 64 boxes are joined
    assert time.perf_counter() - started < 5


def test_trace_says_each_step() -> None:
    trace: list[str] = []
    found = extract_answer("<think>hm</think>$\\boxed{3}$. The final answer is 4<|im_end|>x", trace)
    assert found == Extraction("4", "answer_is")
    assert trace[0].startswith("turn: dropped")
    assert any(line.startswith("rule 2 \\boxed: '3'") for line in trace)
    assert trace[-1] == "rule 3 'the answer is' after the last box wins: '4'"
