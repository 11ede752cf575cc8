"""Score the structure of a Qwen3-VL-Thinking style output (not its correctness).

The score is the sum of three parts; each part is all or nothing:

* **think, 0.5**: each assistant turn has exactly one ``</think>`` and at most one ``<think>``,
  which comes before it. The opening tag may be missing (the chat template puts it in the
  prompt). Turns are separated by ``<tool_response>`` blocks, so an output that holds a whole
  multi-turn tool-use trajectory is judged turn by turn; an output without tool responses is one
  turn.
* **answer, 0.3**: the visible part after the last ``</think>`` (tool-call blocks and chat
  special tokens removed) is not empty; every ``<answer>`` in it is closed; and an answer is not
  only inside the thinking (``<answer>`` in the thinking but none in the visible part).
* **tools, 0.2**: every ``<tool_call>`` is closed (and no ``</tool_call>`` is stray), holds one
  JSON object with a non-empty string ``"name"`` and an object ``"arguments"``, and sits outside
  the thinking. An output without tool calls gets this part.

An empty output scores 0. The reason lists every problem found, or says ``"well-formed"``.
All checks are linear in the length of the output.
"""

from __future__ import annotations

import json
import re

from axpo_verifier.extract import clean_text, split_thinking, strip_tool_blocks

__all__ = ["ANSWER_WEIGHT", "THINK_WEIGHT", "TOOLS_WEIGHT", "format_score"]

THINK_WEIGHT = 0.5
ANSWER_WEIGHT = 0.3
TOOLS_WEIGHT = 0.2

_MAX_LISTED = 3  # problems listed per part before "(+N more)"
_MAX_PROBLEMS = 100
_TOOL_TAG = re.compile(r"</?tool_call>")


def _turns(output: str) -> list[str]:
    """The assistant turns: the text between ``<tool_response>`` blocks."""
    turns: list[str] = []
    pos = 0
    while True:
        start = output.find("<tool_response>", pos)
        if start < 0:
            turns.append(output[pos:])
            return turns
        turns.append(output[pos:start])
        end = output.find("</tool_response>", start)
        if end < 0:
            return turns
        pos = end + len("</tool_response>")


def _think_problems(output: str) -> list[str]:
    problems: list[str] = []
    turns = _turns(output)
    for i, turn in enumerate(turns):
        where = f" in turn {i + 1}" if len(turns) > 1 else ""
        n_close = turn.count("</think>")
        n_open = turn.count("<think>")
        if n_close == 0:
            problems.append(f"no </think>{where}")
        elif n_close > 1:
            problems.append(f"{n_close} </think> tags{where}")
        if n_open > 1:
            problems.append(f"{n_open} <think> tags{where}")
        elif n_open == 1 and n_close >= 1 and turn.find("<think>") > turn.find("</think>"):
            problems.append(f"<think> after </think>{where}")
    return problems


def _answer_problems(output: str) -> list[str]:
    problems: list[str] = []
    last_turn = _turns(output)[-1]
    thinking, visible = split_thinking(last_turn)
    visible = strip_tool_blocks(visible)
    if not visible.strip():
        problems.append("no visible answer after </think>")
    n_open, n_close = visible.count("<answer>"), visible.count("</answer>")
    if n_open != n_close:
        problems.append(f"unbalanced <answer> tags ({n_open} open, {n_close} closed)")
    if n_open == 0 and "<answer>" in thinking:
        problems.append("<answer> only inside the thinking")
    return problems


def _tool_call_problem(body: str) -> str | None:
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return "is not valid JSON"
    if not isinstance(call, dict):
        return "is not a JSON object"
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return 'has no "name"'
    if not isinstance(call.get("arguments"), dict):
        return 'has no "arguments" object'
    return None


def _tools_problems(output: str) -> list[str]:
    problems: list[str] = []
    if any("<tool_call>" in split_thinking(turn)[0] for turn in _turns(output)):
        problems.append("<tool_call> inside the thinking")
    open_at = -1  # end of the open <tool_call>, or -1
    index = 0
    for m in _TOOL_TAG.finditer(output):
        if len(problems) > _MAX_PROBLEMS:
            break
        if m.group() == "<tool_call>":
            if open_at >= 0:
                problems.append(f"tool_call {index} is not closed")
            index += 1
            open_at = m.end()
        elif open_at < 0:
            problems.append("stray </tool_call>")
        else:
            problem = _tool_call_problem(output[open_at : m.start()])
            if problem is not None:
                problems.append(f"tool_call {index} {problem}")
            open_at = -1
    if open_at >= 0:
        problems.append(f"tool_call {index} is not closed")
    return problems


def _summary(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = ""
    if len(problems) > _MAX_PROBLEMS:
        more = " (+many more)"
    elif len(problems) > len(shown):
        more = f" (+{len(problems) - len(shown)} more)"
    return "; ".join(shown) + more


def format_score(output: str) -> tuple[float, str]:
    """Structure score in [0, 1] and the reason (see the module docstring)."""
    output = clean_text(output)
    if not output.strip():
        return 0.0, "empty output"
    score = 0.0
    problems: list[str] = []
    for weight, found in (
        (THINK_WEIGHT, _think_problems(output)),
        (ANSWER_WEIGHT, _answer_problems(output)),
        (TOOLS_WEIGHT, _tools_problems(output)),
    ):
        if found:
            problems.append(_summary(found))
        else:
            score += weight
    return round(score, 6), "; ".join(problems) if problems else "well-formed"
