"""A short supervised warm start, so RL starts from a model that follows the format.

A random-init model (the tiny test model) writes noise: RL on it would spend its steps learning
what a tool call looks like. :func:`warm_start` first teaches the *format* on generated
demonstrations of the ``zoom_digits`` questions (:mod:`axpo.study.tasks`): think, optionally
call ``image_zoom_in_tool`` with valid JSON and read the crop, then answer
``<answer>X</answer>``.

- About ``tool_rate`` of the demonstrations call the tool, the rest answer directly, so the
  warm-started model calls it in about that share of its rollouts.
- The demonstrated answer is the gold letter with probability ``answer_accuracy``, else a wrong
  letter: the tiny model cannot read the digits, and accuracy near chance leaves RL plenty of
  all-wrong tool-using groups to learn from.
- The tool call goes through ``call_tool`` (the tool server's ``Toolbox.call``), so the crops
  the model sees are the tool's real outputs.

It is a thin front of the SFT stage: the demonstrations (``steps x batch_size`` of them) are
written as a demonstration file (:mod:`axpo_learner.sft.format`) into a temporary directory and
trained on by :func:`axpo_learner.sft.train.train`, one pass, which renders them exactly as the
rollout loop renders conversations and writes a complete checkpoint like the input.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from axpo.contracts.domain import Image, ToolCall, ToolResult
from axpo.settings.job import TaskSpec
from axpo.settings.sft import SftSettings
from axpo.study.demo_file import DemoWriter
from axpo.study.tasks import Task, choice_values, task_data, task_from_data
from axpo_learner.sft import train as sft_train

ZOOM_TOOL = "image_zoom_in_tool"
REASON_TOOL = "The box is too small to read. Let me zoom in."
REASON_DIRECT = "I can answer directly."


def padded_box(box: Sequence[int], rng: random.Random) -> list[int]:
    """``box`` (0-1000) grown by a random margin on each side, clamped to [0, 1000]."""
    x1, y1, x2, y2 = box
    return [
        max(0, x1 - rng.randrange(10, 60)),
        max(0, y1 - rng.randrange(10, 60)),
        min(1000, x2 + rng.randrange(10, 60)),
        min(1000, y2 + rng.randrange(10, 60)),
    ]


def demo_record(
    task: Task,
    *,
    tools: Sequence[Mapping[str, Any]],
    call_tool: Callable[[ToolCall, Sequence[Image]], ToolResult],
    system_prompt: str,
    use_tool: bool,
    letter: str,
    rng: random.Random,
    writer: DemoWriter,
) -> dict[str, Any]:
    """The demonstration of ``task`` answering ``letter``, with or without a zoom call, as a
    record of the demonstration file (its images written by ``writer``)."""
    if task.image is None or task.box_1000 is None:
        raise ValueError(f"task {task.task_id}: the warm start demonstrates zoom_digits tasks")
    answer = f"<answer>{letter}</answer>"
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_prompt},
        {
            "role": "user",
            "content": [writer.image(task.image), {"type": "text", "text": task.question}],
        },
    ]
    record = {"id": task.task_id, "tools": list(tools), "messages": messages}
    if not use_tool:
        messages.append(
            {"role": "assistant", "reasoning_content": REASON_DIRECT, "content": answer}
        )
        return record
    arguments = {"bbox_2d": padded_box(task.box_1000, rng), "label": "number box", "img_idx": 0}
    call = ToolCall("call_0", ZOOM_TOOL, json.dumps(arguments, ensure_ascii=False))
    result = call_tool(call, [task.image])
    if result.error is not None:
        raise ValueError(f"task {task.task_id}: the zoom tool failed: {result.error.message}")
    function = {"name": ZOOM_TOOL, "arguments": arguments}
    messages += [
        {
            "role": "assistant",
            "reasoning_content": REASON_TOOL,
            "content": "",
            "tool_calls": [{"type": "function", "function": function}],
        },
        {
            "role": "tool",
            "content": [
                *(writer.image(im) for im in result.images),
                {"type": "text", "text": result.text},
            ],
        },
        {
            "role": "assistant",
            "reasoning_content": f"The number is {choice_values(task)[letter]}.",
            "content": answer,
        },
    ]
    return record


def write_demos(
    path: Path,
    count: int,
    *,
    tools: Sequence[Mapping[str, Any]],
    call_tool: Callable[[ToolCall, Sequence[Image]], ToolResult],
    tasks: TaskSpec,
    system_prompt: str,
    tool_rate: float,
    answer_accuracy: float,
    seed: int,
) -> float:
    """Write ``count`` demonstrations of random tasks of ``tasks`` to ``path``; returns the
    share that call the tool."""
    rng = random.Random(seed)
    cache: dict[int, Task] = {}
    tool_demos = 0
    with DemoWriter(path) as writer:
        for _ in range(count):
            index = rng.randrange(tasks.count)
            if index not in cache:
                cache[index] = task_from_data(task_data(tasks, index))
            task = cache[index]
            if rng.random() < answer_accuracy:
                letter = task.gold
            else:
                letter = rng.choice([c for c in task.choices if c != task.gold])
            use_tool = rng.random() < tool_rate
            writer.write(
                demo_record(
                    task,
                    tools=tools,
                    call_tool=call_tool,
                    system_prompt=system_prompt,
                    use_tool=use_tool,
                    letter=letter,
                    rng=rng,
                    writer=writer,
                )
            )
            tool_demos += use_tool
    return tool_demos / count


def warm_start(
    model_dir: Path,
    out_dir: Path,
    *,
    tools: list[dict[str, Any]],
    call_tool: Callable[[ToolCall, Sequence[Image]], ToolResult],
    tasks: TaskSpec,
    system_prompt: str,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-3,
    tool_rate: float = 0.5,
    answer_accuracy: float = 0.5,
    seed: int = 0,
    train_vision: bool = False,
    device: str = "auto",
    on_step: sft_train.OnStep | None = None,
) -> dict[str, Any]:
    """Train ``model_dir`` on ``steps`` batches of demonstrations and save it to ``out_dir``.

    Returns the SFT metrics (:func:`axpo_learner.sft.train.train`), among them steps,
    first_loss, last_loss (mean of the last 10 steps' losses), seconds, seconds_per_step,
    tokens_per_demo (after image expansion), shared_prefix_tokens and tool_demo_rate.
    ``on_step`` sees each step (:data:`axpo_learner.sft.train.OnStep`). Raises ValueError on
    bad arguments.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not 0 <= tool_rate <= 1 or not 0 <= answer_accuracy <= 1:
        raise ValueError("tool_rate and answer_accuracy must be in [0, 1]")
    if Path(model_dir).resolve() == Path(out_dir).resolve():
        raise ValueError(f"out_dir must differ from model_dir ({model_dir})")
    if tool_rate > 0 and not any(t.get("function", {}).get("name") == ZOOM_TOOL for t in tools):
        raise ValueError(f"tool_rate > 0 needs the {ZOOM_TOOL} spec in tools")
    with tempfile.TemporaryDirectory(prefix="axpo-warm-start-") as tmp:
        data = Path(tmp) / "demos.jsonl"
        write_demos(
            data,
            steps * batch_size,
            tools=tools,
            call_tool=call_tool,
            tasks=tasks,
            system_prompt=system_prompt,
            tool_rate=tool_rate,
            answer_accuracy=answer_accuracy,
            seed=seed,
        )
        settings = SftSettings(
            model=str(model_dir),
            data=str(data),
            out=str(out_dir),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            train_vision=train_vision,
            device=device,
        )
        return sft_train.train(settings, on_step)
