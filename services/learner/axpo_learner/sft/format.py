"""The demonstration file of ``axpo sft``: JSON lines in the chat style of HF datasets, rendered
to exactly the text the rollout loop feeds the model.

One demonstration per line (blank lines are skipped)::

    {"id": "colour_cell-17",
     "tools": [{"type": "function", "function": {"name": ..., "description": ...,
                                                 "parameters": {...}}}],
     "messages": [
       {"role": "system", "content": "..."},
       {"role": "user", "content": [{"type": "image", "image": "images/<sha256>.png"},
                                    {"type": "text", "text": "..."}]},
       {"role": "assistant", "reasoning_content": "Too small. Let me zoom in.", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "image_zoom_in_tool",
                        "arguments": {"bbox_2d": [0, 0, 250, 250], "img_idx": 0}}}]},
       {"role": "tool", "content": [{"type": "image", "image": "images/<sha256>.png"},
                                    {"type": "text", "text": "..."}]},
       {"role": "assistant", "reasoning_content": "The colour is 3.",
        "content": "<answer>3</answer>"}]}

- ``id`` is optional (default ``FILE:LINE``); ``tools`` is optional (no tool schemas in the
  system turn then); the system message is optional (an empty system text then).
- A user or tool message's content is a string, or a list of parts: images first (each
  ``{"type": "image", "image": PATH}``; a path relative to the JSONL file's directory, or
  absolute), then at most one ``{"type": "text", "text": ...}``.
- The conversation is the rollout's: [system], one user message, then assistant turns; every
  assistant turn but the last calls tools and is followed by one tool message per call
  (``arguments`` an object, or a JSON string of one); the last assistant turn calls no tool and
  has content (the answer). Thinking goes in ``reasoning_content``, never in ``content``.

Rendering (:func:`render`) uses :mod:`axpo.contracts.chat`, so the text is byte-identical to a
rollout's: the system turn (``render_system_turn``), the user turn (``render_user_turn``) and
the generation prompt ``<|im_start|>assistant\\n<think>\\n``, untrained; each assistant turn's
model-written text ``reasoning + "\\n</think>\\n\\n" + content`` and its tool calls
(``render_tool_call``; ``\\n`` between content and the first call and between calls, as the
Qwen template writes them), trained; after a turn with calls, ``<|im_end|>\\n``, the tool
responses as one turn (``render_tool_responses``) and the generation prompt, untrained; the
last turn's ``<|im_end|>`` is trained (the model learns to stop).

Every problem is a :class:`DemoFormatError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axpo.contracts import chat

ROLES = ("system", "user", "assistant", "tool")


class SftInputError(ValueError):
    """Bad input to the SFT stage (data, paths, a resume that does not fit); the message says
    what is wrong. ``axpo sft`` prints it without a traceback."""


class DemoFormatError(SftInputError):
    """A demonstration line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Span:
    """A piece of a demonstration's text; ``train`` marks the model-written pieces."""

    text: str
    train: bool


@dataclass(frozen=True)
class Demonstration:
    """One rendered demonstration: ``spans[0]`` is the system turn (the prefix demonstrations
    share), ``images`` the image files of its placeholders in order."""

    id: str
    spans: tuple[Span, ...]
    images: tuple[Path, ...]
    tool_calls: int
    where: str  # FILE:LINE, for messages about it


class _Bad(Exception):
    """A problem inside one record; :func:`render` adds the file and line."""


def _message_where(index: int, part: int | None = None) -> str:
    return f"message {index}" + (f", content part {part}" if part is not None else "")


def _content(message: Mapping[str, Any], index: int, base: Path) -> tuple[str, list[Path]]:
    """The text and image files of a user or tool message."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _Bad(f"{_message_where(index)}: content must be a string or a list of parts")
    images: list[Path] = []
    text: str | None = None
    for i, part in enumerate(content):
        where = _message_where(index, i)
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            if text is not None:
                raise _Bad(f"{where}: image after the text; put images first (rendered first)")
            ref = part.get("image")
            if not isinstance(ref, str) or not ref:
                raise _Bad(f'{where}: an image part needs "image": a file path')
            path = Path(ref) if Path(ref).is_absolute() else base / ref
            if not path.is_file():
                raise _Bad(f"{where}: image file {ref!r} not found ({path})")
            images.append(path)
        elif kind == "text":
            if text is not None:
                raise _Bad(f"{where}: a second text part; join the text into one")
            value = part.get("text")
            if not isinstance(value, str):
                raise _Bad(f'{where}: a text part needs "text": a string')
            text = value
        else:
            raise _Bad(f"{where}: unknown part type {kind!r} (expected image or text)")
    return text or "", images


def _arguments(call: Any, where: str) -> tuple[str, Mapping[str, Any]]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise _Bad(f'{where}: a tool call is {{"type": "function", "function": {{...}}}}')
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _Bad(f'{where}: the tool call\'s function needs a "name"')
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise _Bad(f"{where}: {name} arguments string is not JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise _Bad(f"{where}: {name} arguments must be an object")
    return name, arguments


def assistant_text(reasoning: str, content: str, calls: Sequence[str]) -> str:
    """What the model writes after the generation prompt (without ``<|im_end|>``)."""
    text = f"{reasoning}\n{chat.THINK_CLOSE}\n\n{content}"
    if calls:
        text += ("\n" if content else "") + "\n".join(calls)
    return text


def _assistant(message: Mapping[str, Any], index: int) -> tuple[str, int]:
    """The assistant turn's model-written text and its number of tool calls."""
    where = _message_where(index)
    reasoning = message.get("reasoning_content") or ""
    content = message.get("content") or ""
    if not isinstance(reasoning, str) or not isinstance(content, str):
        raise _Bad(f"{where}: assistant reasoning_content and content must be strings")
    if chat.THINK_OPEN in content or chat.THINK_CLOSE in content:
        raise _Bad(f"{where}: thinking tags in content; put the thinking in reasoning_content")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _Bad(f"{where}: tool_calls must be a list")
    rendered = [
        chat.render_tool_call(*_arguments(c, f"{where}, tool call {i}"))
        for i, c in enumerate(calls)
    ]
    return assistant_text(reasoning, content, rendered), len(rendered)


def _tools(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    tools = record.get("tools") or []
    if not isinstance(tools, list):
        raise _Bad('"tools" must be a list of {"type": "function", "function": {...}} objects')
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _Bad(f'tools[{i}]: expected {{"type": "function", "function": {{"name": ...}}}}')
    return tools


def _spans(record: Mapping[str, Any], base: Path) -> tuple[list[Span], list[Path], int]:
    """The spans, image files and number of tool calls of a record."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise _Bad(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    system = ""
    start = 0
    if messages[0]["role"] == "system":
        system = messages[0].get("content") or ""
        if not isinstance(system, str):
            raise _Bad("message 0: system content must be a string")
        start = 1
    if start >= len(messages) or messages[start]["role"] != "user":
        raise _Bad(f"message {start}: expected the user message (after an optional system one)")
    question, images = _content(messages[start], start, base)
    spans = [
        Span(chat.render_system_turn(system, _tools(record)), False),
        Span(chat.render_user_turn(question, len(images)) + chat.GENERATION_PROMPT, False),
    ]
    i = start + 1
    total_calls = 0
    while i < len(messages):
        role = messages[i]["role"]
        if role != "assistant":
            what = "tool message without a preceding assistant tool call"
            if role in ("system", "user"):
                what = f"a {role} message after the first user message (one question per demo)"
            raise _Bad(f"message {i}: {what}")
        text, calls = _assistant(messages[i], i)
        if not calls:
            if i != len(messages) - 1:
                raise _Bad(f"message {i}: an assistant turn without tool calls must be the last")
            if not messages[i].get("content"):
                raise _Bad(f"message {i}: the last assistant turn has no content (the answer)")
            spans.append(Span(text + chat.IM_END, True))
            return spans, images, total_calls
        spans.append(Span(text, True))
        total_calls += calls
        responses = []
        j = i + 1
        while j < len(messages) and messages[j]["role"] == "tool":
            reply, reply_images = _content(messages[j], j, base)
            responses.append(chat.ToolResponse(reply, len(reply_images)))
            images.extend(reply_images)
            j += 1
        if len(responses) != calls:
            raise _Bad(
                f"message {i}: {calls} tool call(s) answered by {len(responses)} tool message(s)"
            )
        untrained = chat.END_OF_TURN + chat.render_tool_responses(responses)
        spans.append(Span(untrained + chat.GENERATION_PROMPT, False))
        i = j
    last = messages[-1]["role"]
    raise _Bad(
        f"the conversation ends with a {last} message; it must end with an assistant turn "
        "without tool calls (the answer)"
    )


def render(record: Any, *, base: Path, where: str) -> Demonstration:
    """The demonstration of one parsed JSONL ``record``; image paths resolve against ``base``.
    Raises :class:`DemoFormatError` (prefixed with ``where``) on anything malformed."""
    try:
        if not isinstance(record, dict):
            raise _Bad(f"expected a JSON object, got {type(record).__name__}")
        ident = record.get("id", where)
        if not isinstance(ident, str | int) or isinstance(ident, bool):
            raise _Bad('"id" must be a string or an integer')
        spans, images, calls = _spans(record, base)
    except _Bad as exc:
        raise DemoFormatError(f"{where}: {exc}") from None
    return Demonstration(str(ident), tuple(spans), tuple(images), calls, where)


def iter_demonstrations(path: Path) -> Iterator[Demonstration]:
    """Each demonstration of the JSONL file ``path``, rendered (see the module docstring)."""
    path = Path(path)
    base = path.resolve().parent
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DemoFormatError(f"{where}: not valid JSON ({exc.msg})") from None
            yield render(record, base=base, where=where)


def load_demonstrations(path: Path) -> list[Demonstration]:
    """Every demonstration of ``path``; a missing or empty file is a :class:`DemoFormatError`."""
    if not Path(path).is_file():
        raise DemoFormatError(f"{path}: no such demonstration file")
    demos = list(iter_demonstrations(path))
    if not demos:
        raise DemoFormatError(f"{path}: no demonstrations (every line is blank)")
    return demos
