"""The Qwen3-VL-Thinking conversation format: thinking, tools, tool calls, tool responses.

Everything here works on text and is exact to the strings the real chat template renders
(docs/qwen-format.md), so one code path serves the tiny test model and real checkpoints.
The rollout loop is token-in/token-out: it renders only the *delta* it appends (a tool-response
turn) and never re-renders sampled turns.

Tool calls are parsed forgivingly (whitespace, trailing text, an unclosed final call, arguments
given as a JSON string or a Python dict literal) and every problem becomes a
:class:`~axpo.contracts.domain.ToolError` the model reads as its tool response, never an exception.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from axpo.contracts.domain import ToolCall, ToolError, ToolErrorKind

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
GENERATION_PROMPT = f"{IM_START}assistant\n{THINK_OPEN}\n"

# A call's text is read only up to this many characters: longer is malformed, not parsed.
MAX_CALL_CHARS = 64 * 1024

_THINK_TAG = re.compile(r"</?think>")


def split_thinking(output: str) -> tuple[str, str]:
    """Split a model output into (thinking, visible) text.

    The opening ``<think>`` may be missing (the Thinking template puts it in the prompt): text
    before a ``</think>`` with no open ``<think>`` is thinking. An unclosed ``<think>`` makes
    the rest thinking. An output with neither tag is all visible. Segments are joined with
    newlines.

    >>> split_thinking("<think>hmm</think>\\n\\n42")
    ('hmm', '\\n\\n42')
    >>> split_thinking("hmm</think>42")
    ('hmm', '42')
    >>> split_thinking("<think>still thinking")
    ('still thinking', '')
    """
    thinking: list[str] = []
    visible: list[str] = []
    pos = 0
    open_at = -1  # end of the currently open <think>, or -1
    for m in _THINK_TAG.finditer(output):
        if m.group() == THINK_OPEN:
            if open_at < 0:
                visible.append(output[pos : m.start()])
                open_at = m.end()
            # a nested <think> inside thinking is just thinking text
        elif open_at >= 0:
            thinking.append(output[open_at : m.start()])
            open_at = -1
            pos = m.end()
        else:
            thinking.append(output[pos : m.start()])
            pos = m.end()
    if open_at >= 0:
        thinking.append(output[open_at:])
    else:
        visible.append(output[pos:])
    return "\n".join(thinking), "\n".join(v for v in visible if v)


# --------------------------------------------------------------------------- rendering


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The ``# Tools`` block Qwen3-VL's template appends to the system text.

    ``tools`` are OpenAI-style ``{"type": "function", "function": {...}}`` objects, rendered one
    per line with ``json.dumps(..., ensure_ascii=False)`` (key order kept).
    """
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def render_system_turn(system: str, tools: Sequence[Mapping[str, Any]]) -> str:
    """The whole system turn: ``<|im_start|>system\\n...<|im_end|>\\n``."""
    body = render_tools(tools) if not system else f"{system}\n\n{render_tools(tools)}"
    if not tools:
        body = system
    return f"{IM_START}system\n{body}{IM_END}\n"


def render_user_turn(text: str, image_count: int = 0) -> str:
    """A user turn: its images (placeholders) first, then the text, as the template renders a
    message whose content lists the images before the text."""
    return f"{IM_START}user\n{IMAGE_PLACEHOLDER * image_count}{text}{IM_END}\n"


def render_prompt(
    system: str, tools: Sequence[Mapping[str, Any]], question: str, image_count: int = 0
) -> str:
    """The first prompt of a rollout: system turn (with the tools), the user's question with
    its images, and the generation prompt (``<|im_start|>assistant\n<think>\n``)."""
    return (
        render_system_turn(system, tools)
        + render_user_turn(question, image_count)
        + (GENERATION_PROMPT)
    )


# What the rollout appends after a tool call the model closed: the end of the assistant turn.
END_OF_TURN = f"{IM_END}\n"


def render_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as the template writes it (the model's own bytes may differ; keep those)."""
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


@dataclass(frozen=True)
class ToolResponse:
    """What one tool call gives back to the model: text and a number of images."""

    text: str
    image_count: int = 0


def render_tool_responses(responses: Sequence[ToolResponse]) -> str:
    """The user turn carrying tool responses (consecutive responses merge into one turn).

    Images render as placeholders before the text, as the template does for an image followed
    by text in a tool message.
    """
    parts = [
        f"{TOOL_RESPONSE_OPEN}\n{IMAGE_PLACEHOLDER * r.image_count}{r.text}\n{TOOL_RESPONSE_CLOSE}"
        for r in responses
    ]
    return f"{IM_START}user\n" + "\n".join(parts) + f"{IM_END}\n"


def tool_error_text(error: ToolError) -> str:
    """How a tool error reads to the model."""
    return f"Error ({error.kind.value}): {error.message}"


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedToolCall:
    """One ``<tool_call>`` block: the call, or why it cannot be run.

    ``call`` is set whenever a name could be read, also when its arguments are not an object
    (the call records what the model wrote) or fail the tool's schema (``error`` says so);
    ``raw`` is the block's text.
    """

    raw: str
    call: ToolCall | None
    error: ToolError | None

    @property
    def ok(self) -> bool:
        return self.error is None


def find_tool_call_blocks(visible: str) -> list[str]:
    """Texts between ``<tool_call>`` and ``</tool_call>``; an unclosed final block runs to the
    end. A ``</tool_call>`` inside a JSON string of a well-formed call does not end it."""
    blocks: list[str] = []
    pos = 0
    decoder = json.JSONDecoder()
    while (start := visible.find(TOOL_CALL_OPEN, pos)) >= 0:
        body_start = start + len(TOOL_CALL_OPEN)
        close = visible.find(TOOL_CALL_CLOSE, body_start)
        # If the JSON object runs past the first closing tag, that tag was inside a string:
        # end the block at the first tag after the object.
        stripped = len(visible) - body_start - len(visible[body_start:].lstrip())
        try:
            _, obj_end = decoder.raw_decode(visible, body_start + stripped)
        except json.JSONDecodeError:
            obj_end = -1
        if close >= 0 and obj_end > close:
            close = visible.find(TOOL_CALL_CLOSE, obj_end)
        if close < 0:
            blocks.append(visible[body_start:])
            break
        blocks.append(visible[body_start:close])
        pos = close + len(TOOL_CALL_CLOSE)
    return blocks


def _malformed(raw: str, message: str) -> ParsedToolCall:
    return ParsedToolCall(raw, None, ToolError(ToolErrorKind.MALFORMED_CALL, message))


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def _bad_arguments(raw: str, call_id: str, name: str, written: Any, message: str) -> ParsedToolCall:
    """A call of tool ``name`` whose arguments cannot be used: the call is kept (so the rollout
    records a malformed call *of that tool*, with what the model wrote as its arguments) and
    the error tells the model how to write them."""
    call = ToolCall(
        call_id=call_id, name=name, arguments_json=json.dumps(written, ensure_ascii=False)
    )
    hint = f'{name}: {message}; write "arguments": {{...}}, a JSON object'
    return ParsedToolCall(raw, call, ToolError(ToolErrorKind.MALFORMED_CALL, hint))


def _load_object(text: str) -> Any:
    """JSON, forgivingly: the first JSON value (trailing text ignored), else a Python literal."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
        return value
    except json.JSONDecodeError as exc:
        if not text.startswith("{"):
            raise
        try:  # models sometimes write Python dicts: {'name': 'x', 'arguments': {...}}
            value = ast.literal_eval(text[: text.rfind("}") + 1])
            # ...but a Python literal may hold what JSON cannot (a set: {'print(1)'}, bytes,
            # complex numbers): that is no JSON object, so the call is malformed.
            json.dumps(value)
            return value
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            raise exc from None


@lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    import jsonschema  # late: only rollouts that validate against schemas pay the import

    schema = json.loads(schema_json)
    return jsonschema.Draft202012Validator(schema)


def schema_problem(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> str | None:
    """Why ``arguments`` break the JSON Schema ``schema`` (one line), or None if they fit."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(p) for p in first.absolute_path)
    return f"argument {where!r}: {first.message}" if where else first.message


def parse_tool_call(
    raw: str, schemas: Mapping[str, Mapping[str, Any]] | None = None, call_id: str = "call_0"
) -> ParsedToolCall:
    """Parse one block's text. ``schemas`` maps tool name to the JSON Schema of its arguments;
    with it, unknown names and arguments that break the schema become errors."""
    text = raw.strip()
    if not text:
        return _malformed(raw, "empty <tool_call>: expected a JSON object with name and arguments")
    if len(text) > MAX_CALL_CHARS:
        return _malformed(raw, f"tool call longer than {MAX_CALL_CHARS} characters")
    try:
        obj = _load_object(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        return _malformed(
            raw, f'tool call is not valid JSON ({msg}); write {{"name": ..., "arguments": {{...}}}}'
        )
    if not isinstance(obj, dict):
        return _malformed(raw, f"tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return _malformed(raw, 'tool call needs a "name" string')
    written = arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # arguments sent as a serialized JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return _bad_arguments(
                raw, call_id, name, written, f'"arguments" string is not valid JSON ({exc.msg})'
            )
    if not isinstance(arguments, dict):
        return _bad_arguments(
            raw, call_id, name, written, f'"arguments" must be an object, got {_kind(arguments)}'
        )
    call = ToolCall(
        call_id=call_id, name=name, arguments_json=json.dumps(arguments, ensure_ascii=False)
    )
    if schemas is not None:
        if name not in schemas:
            known = ", ".join(sorted(schemas)) or "none"
            return ParsedToolCall(
                raw,
                call,
                ToolError(ToolErrorKind.UNKNOWN_TOOL, f"unknown tool {name!r}; available: {known}"),
            )
        problem = schema_problem(arguments, schemas[name])
        if problem is not None:
            return ParsedToolCall(
                raw, call, ToolError(ToolErrorKind.BAD_ARGUMENTS, f"{name}: {problem}")
            )
    return ParsedToolCall(raw, call, None)


def parse_tool_calls(
    output: str,
    schemas: Mapping[str, Mapping[str, Any]] | None = None,
    call_id_start: int = 0,
) -> list[ParsedToolCall]:
    """Every tool call in the visible part of ``output`` (calls inside thinking are ignored).

    >>> [p.call.name for p in parse_tool_calls(
    ...     '<think>maybe <tool_call>{"name": "no"}</tool_call></think>\\n\\n'
    ...     '<tool_call>\\n{"name": "zoom", "arguments": {"x": 1}}\\n</tool_call>')]
    ['zoom']
    """
    _, visible = split_thinking(output)
    return [
        parse_tool_call(raw, schemas, call_id=f"call_{call_id_start + i}")
        for i, raw in enumerate(find_tool_call_blocks(visible))
    ]
