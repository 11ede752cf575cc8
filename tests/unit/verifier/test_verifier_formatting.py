"""Format score: think / answer / tool-call structure of an output."""

from __future__ import annotations

import json
import time

import pytest

from axpo_verifier.formatting import format_score

CALL = '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox": [1, 2, 3, 4]}}\n</tool_call>'
RESPONSE = "<tool_response>\n<image>\n</tool_response>"


@pytest.mark.parametrize(
    ("output", "score", "fragment"),
    [
        pytest.param("<think>count</think>\n\nThere are 7.", 1.0, "well-formed", id="ideal"),
        pytest.param("count</think>\n\n7", 1.0, "well-formed", id="opening-think-in-prompt"),
        pytest.param(
            f"<think>zoom</think>\n{CALL}\n{RESPONSE}\n<think>ok</think>\nThe answer is B.",
            1.0,
            "well-formed",
            id="multi-turn-tool-use",
        ),
        pytest.param(
            f"<think>zoom</think>\nLet me look closer.\n{CALL}\n{RESPONSE}\nok</think>\n(B)",
            1.0,
            "well-formed",
            id="multi-turn-second-think-opened-by-template",
        ),
        pytest.param("7", 0.5, "no </think>", id="no-thinking"),
        pytest.param("<think>long reasoning, truncated", 0.2, "no </think>", id="truncated"),
        pytest.param("<think>a</think>", 0.7, "no visible answer", id="empty-visible"),
        pytest.param("<think>a</think>\n  \n", 0.7, "no visible answer", id="blank-visible"),
        pytest.param("<think>a</think>b</think>c", 0.5, "2 </think> tags", id="two-closes"),
        pytest.param("<think><think>a</think>b", 0.5, "2 <think> tags", id="two-opens"),
        pytest.param("a</think>b<think>c", 0.5, "<think> after </think>", id="open-after-close"),
        pytest.param(
            "<think><answer>3</answer></think>",
            0.7,
            "only inside the thinking",
            id="answer-only-in-think",
        ),
        pytest.param(
            "<think>x</think><answer>3", 0.7, "unbalanced <answer>", id="unclosed-answer-tag"
        ),
        pytest.param("<think>x</think><answer>3</answer>", 1.0, "well-formed", id="answer-tag"),
        pytest.param(f"<think>x</think>{CALL}", 0.7, "no visible answer", id="ends-in-tool-call"),
        pytest.param(
            "<think>x</think>ok <tool_call>{not json}</tool_call>",
            0.8,
            "not valid JSON",
            id="tool-call-bad-json",
        ),
        pytest.param(
            '<think>x</think>ok <tool_call>["zoom_in"]</tool_call>',
            0.8,
            "not a JSON object",
            id="tool-call-json-array",
        ),
        pytest.param(
            '<think>x</think>ok <tool_call>{"arguments": {}}</tool_call>',
            0.8,
            'no "name"',
            id="tool-call-no-name",
        ),
        pytest.param(
            '<think>x</think>ok <tool_call>{"name": "zoom_in", "arguments": "[1,2]"}</tool_call>',
            0.8,
            'no "arguments" object',
            id="tool-call-arguments-string",
        ),
        pytest.param(
            '<think>x</think>ok <tool_call>{"name": "zoom_in", "arguments": {}}',
            0.8,
            "not closed",
            id="tool-call-unclosed",
        ),
        pytest.param(
            "<think>x</think>ok </tool_call>", 0.8, "stray </tool_call>", id="stray-close"
        ),
        pytest.param(
            f"<think>x {CALL}</think>ok", 0.8, "inside the thinking", id="tool-call-in-think"
        ),
        pytest.param("", 0.0, "empty output", id="empty"),
        pytest.param("\x00\x01", 0.0, "empty output", id="only-controls"),
    ],
)
def test_format_score(output: str, score: float, fragment: str) -> None:
    got, reason = format_score(output)
    assert got == pytest.approx(score), reason
    assert fragment in reason


@pytest.mark.parametrize(
    "output",
    [
        pytest.param("<think>x</think>" + "<tool_call>" * 100_000, id="100k-open-tool-calls"),
        pytest.param(
            "<think>x</think><tool_call>" + "[" * 100_000 + "</tool_call>",
            id="deep-json-unclosed",
        ),
        pytest.param(
            "<think>x</think><tool_call>"
            + json.dumps({"name": "z", "arguments": {"a": "x" * 10**6}})
            + "</tool_call>ok",
            id="1MB-tool-call",
        ),
        pytest.param("<tool_response>" * 100_000, id="100k-tool-responses"),
        pytest.param("</think>" * 100_000, id="100k-closes"),
    ],
)
def test_format_score_is_linear(output: str) -> None:
    start = time.perf_counter()
    score, _ = format_score(output)
    assert 0.0 <= score <= 1.0
    assert time.perf_counter() - start < 1.0
