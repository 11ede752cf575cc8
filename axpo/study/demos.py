"""Demonstrations for the SFT stage: the study's questions solved with and without tools, as a
JSONL file of Qwen-style conversations (the format ``axpo sft`` reads; services/learner/README.md).

Each line is one conversation: a system turn with the tool schemas, the user's question (with its
image), and either

- a tool-using solution: thinking that decides to call the family's tool, the call with the
  arguments the task says reveal the answer (:attr:`Task.tool_arguments`), the tool's real
  response (produced by ``call_tool``, i.e. the tool server's code: real crops, real Python
  output, real search results), then thinking that reads the result and the answer; or
- a direct answer: brief thinking and a *guess* drawn from the family's answer space, so the
  demonstrations teach the format of answering directly without teaching a way to be right
  without the tool (a direct answer stays at chance).

``tool_rate`` sets the share of tool-using demonstrations: the SFT policy then calls a tool on
about that share of its rollouts, which leaves RL room to learn when a tool pays.

Images are written once each under ``images/<sha256>.<ext>`` next to the JSONL file and referred
to by relative path. Pure Python (plus Pillow through the task generators).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axpo.contracts.domain import Image, ToolCall, ToolResult
from axpo.study.demo_file import DemoWriter
from axpo.study.families import colour_cell
from axpo.study.task import Task

CallTool = Callable[[ToolCall, Sequence[Image]], ToolResult]


@dataclass(frozen=True)
class DemoStats:
    """What :func:`write_demos` wrote."""

    path: Path
    demos: int
    tool_demos: int
    images: int
    per_family: dict[str, int]


def _thinking(task: Task) -> tuple[str, str]:
    """(before the call, after the result) thinking of a tool-using demonstration."""
    if task.family == colour_cell.FAMILY:
        row, col = _row_col(task)
        return (
            f"The cells are too fine to see at this size. Let me zoom in on row {row}, "
            f"column {col}.",
            f"The cell is {task.answer_text}.",
        )
    if task.tool == "python":
        return "Let me compute it with Python.", f"The result is {task.answer_text}."
    if task.tool == "search":
        query = task.tool_arguments.get("query", "")
        return f"Let me search for {query}.", f"The year is {task.answer_text}."
    return "Let me zoom in.", f"The answer is {task.gold}."


def _row_col(task: Task) -> tuple[int, int]:
    assert task.box_1000 is not None
    x1, y1 = task.box_1000[0], task.box_1000[1]
    step = 1000 // colour_cell.GRID
    return y1 // step + 1, x1 // step + 1


def guess(task: Task, rng: random.Random) -> str:
    """An answer drawn from the family's answer space without looking at the question."""
    if task.family == colour_cell.FAMILY:
        return str(rng.randrange(len(colour_cell.PALETTE)))
    if task.family == "arith":
        return str(rng.randint(100, 9801))
    if task.family == "town_facts":
        return str(rng.randint(800, 2015))
    if task.choices:
        return rng.choice(task.choices)
    raise ValueError(f"no guess for family {task.family!r}")


def _user_content(task: Task, writer: DemoWriter) -> list[dict[str, Any]] | str:
    if task.image is None:
        return task.question
    return [writer.image(task.image), {"type": "text", "text": task.question}]


def demonstration(
    task: Task,
    *,
    use_tool: bool,
    tools: Sequence[Mapping[str, Any]],
    system_prompt: str,
    call_tool: CallTool,
    rng: random.Random,
    writer: DemoWriter,
) -> dict[str, Any]:
    """One conversation (a JSONL record) solving ``task`` with its tool, or guessing directly.

    Raises ValueError when the family's tool is not among ``tools`` or the tool call fails
    (a demonstration must show a working call).
    """
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": _user_content(task, writer)},
    ]
    if not use_tool:
        messages.append(
            {
                "role": "assistant",
                "reasoning_content": "I will answer without a tool.",
                "content": f"<answer>{guess(task, rng)}</answer>",
            }
        )
    else:
        names = {t["function"]["name"] for t in tools}
        if task.tool not in names:
            raise ValueError(f"{task.task_id}: its tool {task.tool!r} is not offered ({names})")
        before, after = _thinking(task)
        arguments = dict(task.tool_arguments)
        call = ToolCall("call_0", task.tool, json.dumps(arguments, ensure_ascii=False))
        result = call_tool(call, list(task.images))
        if result.error is not None:
            raise ValueError(
                f"{task.task_id}: the demonstration's {task.tool} call failed: "
                f"{result.error.kind.value}: {result.error.message}"
            )
        tool_content: list[dict[str, Any]] = [writer.image(im) for im in result.images]
        tool_content.append({"type": "text", "text": result.text})
        messages += [
            {
                "role": "assistant",
                "reasoning_content": before,
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": task.tool, "arguments": arguments}}
                ],
            },
            {"role": "tool", "content": tool_content},
            {
                "role": "assistant",
                "reasoning_content": after,
                "content": f"<answer>{task.gold}</answer>",
            },
        ]
    return {
        "id": f"{task.task_id}-{'tool' if use_tool else 'direct'}",
        "tools": list(tools),
        "messages": messages,
    }


def write_demos(
    tasks: Sequence[Task],
    path: Path,
    *,
    tools: Sequence[Mapping[str, Any]],
    system_prompt: str,
    call_tool: CallTool,
    tool_rate: float,
    seed: int = 0,
) -> DemoStats:
    """Write one demonstration per task to ``path`` (JSONL; images next to it), a tool-using
    one with probability ``tool_rate``. Deterministic for the same tasks, tools and seed.

    Raises ValueError for ``tool_rate`` outside [0, 1].
    """
    if not 0 <= tool_rate <= 1:
        raise ValueError(f"tool_rate must be in [0, 1], got {tool_rate}")
    rng = random.Random(seed)
    tool_demos = 0
    per_family: dict[str, int] = {}
    images: set[str] = set()
    with DemoWriter(path) as writer:
        for task in tasks:
            use_tool = rng.random() < tool_rate
            record = demonstration(
                task,
                use_tool=use_tool,
                tools=tools,
                system_prompt=system_prompt,
                call_tool=call_tool,
                rng=rng,
                writer=writer,
            )
            writer.write(record)
            images.update(
                part["image"]
                for message in record["messages"]
                if isinstance(message["content"], list)
                for part in message["content"]
                if part.get("type") == "image"
            )
            tool_demos += use_tool
            per_family[task.family] = per_family.get(task.family, 0) + 1
    return DemoStats(path, len(tasks), tool_demos, len(images), per_family)
