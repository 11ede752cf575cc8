"""Start-up check: does the checkpoint's own chat template render what the rollout builds?

The rollout never asks a chat template for text. It renders the Qwen3-VL-Thinking format itself
(:mod:`axpo.contracts.chat`) and is token-in/token-out: it tokenizes the prompt, keeps the
sampled tokens, and tokenizes only each *delta* it appends (``<|im_end|>\\n``, the
tool-response turn and the next generation prompt). That is right only when the template the
checkpoint was trained with renders the same text, and the same tokens, at every point where
the rollout appends something. :func:`check_chat_template` checks it once, at a worker's
start-up, on one sample conversation: a system turn with the tools, a user question with an
image, an assistant turn that thinks and calls a tool, the tool's response (an image and text),
and a final thinking answer.

**What is compared.** The conversation is rendered by the checkpoint's template (through
transformers' chat-template renderer, as ``apply_chat_template(..., tokenize=False)`` does) and
built the rollout's way (pieces rendered by :mod:`axpo.contracts.chat`, sampled turns as the
model writes them), and both are tokenized with the checkpoint's ``tokenizer.json`` as
:class:`axpo_rollout.agent.Vocab` does: the template's text in one piece, the rollout's piece by
piece (so a BPE merge across a piece boundary shows up as a difference). Token ids must be
equal for each prefix the rollout sends to the engine or trains on:

1. the prompt, up to the generation prompt (template: first two messages with
   ``add_generation_prompt``);
2. prompt + the tool-call turn + the tool-response delta, which ends with the next generation
   prompt (template: up to the tool message, with ``add_generation_prompt``);
3. the whole conversation, final answer included (template: every message); the template's
   ``\\n`` after the final ``<|im_end|>`` is compared too, though no trajectory holds it.

**What is not.** Qwen's template drops the thinking of assistant turns *before the last real
user query*; the sample has a single user query, so no turn's thinking is dropped, and a rollout
never re-renders earlier turns, so that rule never applies to one. The tool-call turn is
compared as the template writes the call (arguments via ``tojson``): the model's own bytes may
differ, and the rollout keeps those. Every template file the checkpoint ships
(``chat_template.jinja``, ``chat_template.json``, ``tokenizer_config.json``'s
``chat_template``, ``processor_config.json``'s, ``additional_chat_templates/tool_use.jinja``)
is checked; identical ones once.

transformers (its chat-template renderer, not the tokenizer classes: no torch is imported) and
tokenizers are imported inside the functions, so importing this module costs nothing.

>>> check_chat_template("/models/Qwen3-VL-2B-Thinking").pieces  # doctest: +SKIP
('prompt', 'tool-call turn', 'tool-response delta', 'final answer turn', 'end of conversation')
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axpo.contracts import chat

# --------------------------------------------------------------------------- sample conversation

SAMPLE_SYSTEM = "You are a careful visual assistant. Give the final answer as <answer>X</answer>."
# The zoom tool's schema (Qwen-Agent's image_zoom_in_tool); the en dash checks that non-ASCII
# text is written as is (json.dumps(..., ensure_ascii=False)), as the template's tojson does.
SAMPLE_TOOLS: tuple[dict[str, Any], ...] = (
    {
        "type": "function",
        "function": {
            "name": "image_zoom_in_tool",
            "description": "Zoom in on a region of an image; bbox_2d in relative 0–1000 units.",
            "parameters": {
                "type": "object",
                "properties": {
                    "bbox_2d": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 4,
                        "maxItems": 4,
                    },
                    "label": {"type": "string"},
                    "img_idx": {"type": "integer"},
                },
                "required": ["bbox_2d", "label"],
            },
        },
    },
)
QUESTION = "Which colour is the framed cell?"
CALL_THINKING = "The framed cell is too small to read at this size.\nLet me zoom in on it."
CALL_ARGUMENTS: dict[str, Any] = {"bbox_2d": [120, 40, 560, 380], "label": "framed cell"}
TOOL_TEXT = "Zoomed in on the framed cell."
ANSWER_THINKING = "The crop shows a green cell."
ANSWER = "<answer>green</answer>"

# Template files, in the order transformers' tokenizer and processor look for them.
TEMPLATE_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer_config.json",
    "processor_config.json",
    "additional_chat_templates/tool_use.jinja",
)

CONTEXT_CHARS = 20  # shown on each side of the first difference


class TemplateMismatch(ValueError):
    """The checkpoint's chat template cannot reproduce a piece of what the rollout builds.

    ``piece`` names it (``prompt``, ``tool-call turn``, ``tool-response delta``, ``final answer
    turn``, ``end of conversation``, or ``rendering`` when the template fails on the sample),
    ``position`` is the first differing token (None when rendering failed)."""

    def __init__(
        self, message: str, *, checkpoint: Path, source: str, piece: str, position: int | None
    ) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.source = source
        self.piece = piece
        self.position = position


@dataclass(frozen=True)
class TemplateReport:
    """A passed check: which template files were checked, which pieces were compared token
    for token, how many tokens the sample conversation has, and how long the check took."""

    checkpoint: Path
    sources: tuple[str, ...]
    pieces: tuple[str, ...]
    tokens: int
    seconds: float


# --------------------------------------------------------------------------- the two renderings


@dataclass(frozen=True)
class _Stage:
    """One comparison: the template renders ``messages`` (with the generation prompt or not);
    the rollout's ``pieces`` (name, text) are tokenized one by one and concatenated. The first
    ``checked`` pieces passed an earlier stage: a difference inside them (the template rendering
    an earlier turn otherwise once a later one follows) is blamed on the first new piece."""

    messages: list[dict[str, Any]]
    add_generation_prompt: bool
    pieces: list[tuple[str, str]]
    checked: int


def _stages(system: str, tools: Sequence[Mapping[str, Any]]) -> list[_Stage]:
    # Without tools, render_prompt always writes a system turn (an empty one for empty text):
    # the template's rendering of a system message. With tools and no system text it writes
    # the tools block alone: the template's rendering when there is no system message.
    messages: list[dict[str, Any]] = []
    if system or not tools:
        messages.append({"role": "system", "content": system})
    messages.append(
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    )
    prompt = ("prompt", chat.render_prompt(system, tools, QUESTION, image_count=1))
    answer_turn = (
        "final answer turn",
        f"{ANSWER_THINKING}\n{chat.THINK_CLOSE}\n\n{ANSWER}{chat.IM_END}",
    )
    answer = {"role": "assistant", "content": ANSWER, "reasoning_content": ANSWER_THINKING}
    # The rollout's trajectory ends at the sampled <|im_end|>; the template adds "\n".
    end = ("end of conversation", "\n")
    stages = [_Stage(list(messages), True, [prompt], 0)]
    if not tools:  # no tool is offered: the model answers directly
        stages.append(_Stage([*messages, answer], False, [prompt, answer_turn, end], 1))
        return stages
    name = str(tools[0]["function"]["name"])
    # The rollout's turn ends at </tool_call> (the stop token); the delta starts with <|im_end|>.
    call_turn = (
        "tool-call turn",
        f"{CALL_THINKING}\n{chat.THINK_CLOSE}\n\n{chat.render_tool_call(name, CALL_ARGUMENTS)}",
    )
    delta = (
        "tool-response delta",
        chat.END_OF_TURN
        + chat.render_tool_responses([chat.ToolResponse(TOOL_TEXT, image_count=1)])
        + chat.GENERATION_PROMPT,
    )
    call = {
        "role": "assistant",
        "content": "",
        "reasoning_content": CALL_THINKING,
        "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": CALL_ARGUMENTS}}
        ],
    }
    tool = {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": TOOL_TEXT}]}
    stages.append(_Stage([*messages, call, tool], True, [prompt, call_turn, delta], 1))
    stages.append(
        _Stage(
            [*messages, call, tool, answer], False, [prompt, call_turn, delta, answer_turn, end], 3
        )
    )
    return stages


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _named(value: Any, path: Path) -> str | None:
    """A ``chat_template`` value: a template, or transformers' list of named templates (the one
    it picks when tools are given: ``tool_use``, else ``default``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("tool_use") or named.get("default")
        if isinstance(chosen, str):
            return chosen
    raise ValueError(f"{path}: chat_template is neither a template nor a named list with one")


def chat_templates(checkpoint_dir: Path) -> dict[str, str]:
    """Every chat template the checkpoint ships, by file, identical ones under the first file
    (``"chat_template.jinja, tokenizer_config.json"``). Raises FileNotFoundError without one."""
    found: dict[str, str] = {}
    for name in TEMPLATE_FILES:
        path = checkpoint_dir / name
        if not path.is_file():
            continue
        text = path.read_text() if name.endswith(".jinja") else None
        if text is None:
            text = _named(_read_json(path).get("chat_template"), path)
        if text:
            found[name] = text
    if not found:
        raise FileNotFoundError(
            f"{checkpoint_dir}: no chat template (looked for {', '.join(TEMPLATE_FILES)}); the "
            "start-up check needs the template the checkpoint was trained with"
        )
    by_text: dict[str, list[str]] = {}
    for name, text in found.items():
        by_text.setdefault(text, []).append(name)
    return {", ".join(names): text for text, names in by_text.items()}


def _special_tokens(checkpoint_dir: Path) -> dict[str, str]:
    """The special-token strings transformers passes to a template (``eos_token`` ...)."""
    path = checkpoint_dir / "tokenizer_config.json"
    config = _read_json(path) if path.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token"):
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken written out: {"content": ..., ...}
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _render(
    template: str,
    stage: _Stage,
    tools: Sequence[Mapping[str, Any]],
    special: Mapping[str, str],
) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    # What apply_chat_template(tokenize=False) calls, with the tokenizer's special tokens as
    # template variables; called directly, as AutoTokenizer would import torch. It returns
    # (texts, generation indices), whatever its annotation says.
    variables: dict[str, Any] = dict(special)
    result: Any = render_jinja_template(
        conversations=[stage.messages],
        tools=[dict(t) for t in tools] or None,
        chat_template=template,
        add_generation_prompt=stage.add_generation_prompt,
        **variables,
    )
    return str(result[0][0])


# --------------------------------------------------------------------------- the check


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _around(text: str, offset: int) -> str:
    """``CONTEXT_CHARS`` characters either side of ``offset``, the split marked by ``^``."""
    before = text[max(0, offset - CONTEXT_CHARS) : offset]
    return f"{before!r} ^ {text[offset : offset + CONTEXT_CHARS]!r}"


def check_chat_template(
    checkpoint_dir: str | Path,
    *,
    system: str = SAMPLE_SYSTEM,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> TemplateReport:
    """Check that the checkpoint's chat template(s) reproduce, token for token, what the
    rollout builds for a sample conversation (module docstring: what is compared and why).

    ``system`` and ``tools`` (OpenAI-style ``{"type": "function", "function": {...}}``; None:
    :data:`SAMPLE_TOOLS`, ``[]``: none) are those the job offers; the tool-call turn calls the
    first tool. Raises :class:`TemplateMismatch` naming the checkpoint, the template file, the
    piece that differs, the first differing token and the text around it in both; raises
    FileNotFoundError when the checkpoint has no ``tokenizer.json`` or no chat template.
    """
    import jinja2
    from tokenizers import Tokenizer

    started = time.perf_counter()
    root = Path(checkpoint_dir)
    tokenizer_path = root / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path}: no tokenizer.json (the rollout loop needs it)")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tools = list(SAMPLE_TOOLS) if tools is None else list(tools)
    special = _special_tokens(root)
    templates = chat_templates(root)
    stages = _stages(system, tools)

    def encode(text: str, shift: int = 0) -> tuple[list[int], list[int]]:
        """Token ids and where each token starts in the text (plus ``shift``)."""
        encoding = tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [shift + start for start, _ in encoding.offsets]

    tokens = 0
    for source, template in templates.items():
        for stage in stages:
            try:
                text = _render(template, stage, tools, special)
            except (jinja2.TemplateError, TypeError, ValueError, KeyError) as exc:
                raise TemplateMismatch(
                    f"{root}: its chat template ({source}) fails on the sample conversation "
                    f"({len(stage.messages)} messages): {type(exc).__name__}: {exc}",
                    checkpoint=root,
                    source=source,
                    piece="rendering",
                    position=None,
                ) from exc
            expected, expected_starts = encode(text)
            ours = ""
            built: list[int] = []
            starts: list[int] = []
            ends: list[int] = []
            for _, piece_text in stage.pieces:
                ids, piece_starts = encode(piece_text, shift=len(ours))
                built += ids
                starts += piece_starts
                ends.append(len(built))
                ours += piece_text
            at = _first_difference(built, expected)
            if at is None:
                tokens = max(tokens, len(built))
                continue
            index = next((i for i, end in enumerate(ends) if at < end), len(ends) - 1)
            piece = stage.pieces[max(index, stage.checked)][0]
            ours_at = starts[at] if at < len(starts) else len(ours)
            text_at = expected_starts[at] if at < len(expected_starts) else len(text)
            raise TemplateMismatch(
                f"{root}: its chat template ({source}) cannot reproduce the rollout's {piece}: "
                f"first differing token at position {at} ({len(built)} rollout tokens, "
                f"{len(expected)} template tokens)\n"
                f"  rollout:  {_around(ours, ours_at)}\n"
                f"  template: {_around(text, text_at)}\n"
                "The rollout writes the Qwen3-VL-Thinking format of axpo.contracts.chat "
                "(docs/qwen-format.md) and never re-renders, so this checkpoint would see other "
                "text than it was trained on: use a checkpoint with a Qwen3-VL-Thinking chat "
                "template, or give this one such a template.",
                checkpoint=root,
                source=source,
                piece=piece,
                position=at,
            )
    pieces = tuple(dict.fromkeys(name for stage in stages for name, _ in stage.pieces))
    return TemplateReport(
        checkpoint=root,
        sources=tuple(templates),
        pieces=pieces,
        tokens=tokens,
        seconds=round(time.perf_counter() - started, 3),
    )
