"""Find the answer in a model output.

Outputs look like Qwen3-VL-Thinking generations::

    <think>reasoning</think>

    visible text, maybe <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks

The opening ``<think>`` may be missing (the chat template puts it in the prompt): text before a
``</think>`` that has no matching ``<think>`` is thinking. A ``<think>`` that is never closed
makes the rest of the output thinking. Text inside thinking never counts as the answer.

In the visible part, with tool-call and tool-response blocks and chat special tokens removed,
the answer is, in this order of priority:

1. the content of the last ``<answer>...</answer>`` (an unclosed last ``<answer>`` runs to the
   end); a ``\\boxed{}`` inside it is unwrapped;
2. the content of the last complete ``\\boxed{...}`` or ``\\fbox{...}``;
3. what follows the last "the answer is" / "answer:" / "final answer:" (case-insensitive) up to
   the end of its line (or the next non-empty line when that is empty), cut at the end of the
   first sentence, markdown bold and a trailing period removed;
4. the last non-empty line.

Every step is linear in the length of the output: ``str.find``/``rfind``, bounded regexes and
one forward scan for braces (no recursion, so 5,000 nested braces are fine).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from axpo.contracts.chat import split_thinking

__all__ = [
    "Extraction",
    "clean_text",
    "extract_answer",
    "split_thinking",
    "strip_tool_blocks",
]

Source = Literal["answer_tag", "boxed", "answer_is", "last_line"]


@dataclass(frozen=True)
class Extraction:
    """The answer found in an output and the rule that found it."""

    text: str
    source: Source


# --------------------------------------------------------------------------- cleaning

# C0 controls except tab and newline, DEL, C1 controls, zero-width and bidi-control characters.
_DROP = [c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)]
_DROP += list(range(0x7F, 0xA0))
_DROP += [0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD]
_DROP += list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A))
_TRANSLATE: dict[int, str | None] = dict.fromkeys(_DROP)
_TRANSLATE.update({0x2028: "\n", 0x2029: "\n", 0x00A0: " "})


def clean_text(text: str) -> str:
    """Drop control, zero-width and bidi characters; normalize line breaks to ``\\n``."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.translate(_TRANSLATE)


# --------------------------------------------------------------------------- tool blocks
# (thinking is split by axpo.contracts.chat.split_thinking, shared with the rollout's
# tool-call parser)

_BLOCKS = (("<tool_call>", "</tool_call>"), ("<tool_response>", "</tool_response>"))
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")


def strip_tool_blocks(visible: str) -> str:
    """Remove ``<tool_call>``/``<tool_response>`` blocks (an unclosed one runs to the end) and
    chat special tokens such as ``<|im_end|>``."""
    for open_tag, close_tag in _BLOCKS:
        if open_tag not in visible and close_tag not in visible:
            continue
        parts: list[str] = []
        pos = 0
        while True:
            start = visible.find(open_tag, pos)
            if start < 0:
                parts.append(visible[pos:])
                break
            parts.append(visible[pos:start])
            end = visible.find(close_tag, start + len(open_tag))
            if end < 0:
                break
            parts.append("\n")
            pos = end + len(close_tag)
        visible = "".join(parts).replace(close_tag, "\n")
    if "<|" in visible:
        visible = _SPECIAL_TOKEN.sub("\n", visible)
    return visible


# --------------------------------------------------------------------------- <answer> tags


def _answer_tag(visible: str) -> str | None:
    start = visible.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = visible.find("</answer>", start)
    content = visible[start:] if end < 0 else visible[start:end]
    boxed = _last_boxed(content)
    if boxed is not None:
        content = boxed
    content = _tidy(content)
    return content or None


# --------------------------------------------------------------------------- \boxed{}

_BOX_CMDS = ("\\boxed", "\\fbox")
_MAX_BOX_TRIES = 8


def _last_box_command(text: str, end: int) -> tuple[int, int]:
    """Start and end of the last ``\\boxed``/``\\fbox`` starting before ``end``; (-1, -1)."""
    best = (-1, -1)
    for cmd in _BOX_CMDS:
        i = text.rfind(cmd, 0, end)
        # skip longer command names such as \boxedsomething
        while i >= 0:
            after = i + len(cmd)
            if after >= len(text) or not text[after].isalpha():
                break
            i = text.rfind(cmd, 0, i)
        if i > best[0]:
            best = (i, i + len(cmd))
    return best


_BRACE = re.compile(r"[{}]")


def _match_braces(text: str, open_pos: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or -1. Escaped braces (``\\{``)
    do not count. One forward scan with a depth counter, no recursion."""
    depth = 0
    for m in _BRACE.finditer(text, open_pos):
        j = m.start()
        if text[j - 1] == "\\" and _escaped(text, j):
            continue
        if text[j] == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _escaped(text: str, j: int) -> bool:
    """Whether the character at ``j`` is preceded by an odd number of backslashes."""
    k = j - 1
    while k >= 0 and text[k] == "\\":
        k -= 1
    return (j - 1 - k) % 2 == 1


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}`` (or ``\\boxed 5``)."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    end = len(text)
    for _ in range(_MAX_BOX_TRIES):
        start, after = _last_box_command(text, end)
        if start < 0:
            return None
        j = after
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _match_braces(text, j)
            if close >= 0:
                return text[j + 1 : close].strip()
        elif j > after and j < len(text):
            # "\boxed 5": one token up to whitespace or "$"
            k = j
            while k < len(text) and not text[k].isspace() and text[k] != "$":
                k += 1
            if k > j:
                return text[j:k]
        end = start
    return None


# --------------------------------------------------------------------------- "the answer is"

_ANSWER_IS = re.compile(
    r"\b(?:final\s{1,3})?answer(?:\s{0,3}\*\*)?\s{0,3}(?:is\b(?:\s{0,3}\*\*)?\s{0,3}[:：]?|[:：])"
    r"|\bfinal\s{1,3}answer\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?](?=\s{1,4}[A-Z])")
_MAX_HEADING_SKIP = 20


def _answer_is(visible: str) -> str | None:
    last: re.Match[str] | None = None
    for m in _ANSWER_IS.finditer(visible):
        last = m
    if last is None:
        return None
    pos = last.end()
    # the rest of the line, or the next non-empty line when the line ends here
    for _ in range(_MAX_HEADING_SKIP):
        nl = visible.find("\n", pos)
        line = visible[pos:] if nl < 0 else visible[pos:nl]
        text = _tidy(line.strip().strip("*#:：").strip())
        if text:
            cut = _SENTENCE_END.search(text)
            if cut is not None:
                text = _tidy(text[: cut.start()])
            return text or None
        if nl < 0:
            return None
        pos = nl + 1
    return None


# --------------------------------------------------------------------------- last line


def _last_line(visible: str) -> str | None:
    end = len(visible)
    while end > 0:
        nl = visible.rfind("\n", 0, end)
        line = _tidy(visible[nl + 1 : end])
        if line:
            return line
        end = nl if nl >= 0 else 0
    return None


# --------------------------------------------------------------------------- helpers


def _tidy(text: str) -> str:
    """Strip whitespace, markdown bold/italic markers and one trailing period."""
    period_removed = False
    for _ in range(3):  # bounded: each pass is linear, and nesting deeper than this is noise
        text = text.strip()
        if not period_removed and text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
            period_removed = True
        text = text.strip("*").strip()
    return text


def extract_answer(output: str) -> Extraction | None:
    """The answer in ``output`` (see the module docstring), or None when there is none.

    >>> extract_answer("<think>maybe 3</think>The answer is 4.")
    Extraction(text='4', source='answer_is')
    """
    if not output:
        return None
    output = clean_text(output)
    if not output.strip():
        return None
    _, visible = split_thinking(output)
    visible = strip_tool_blocks(visible)
    if not visible.strip():
        return None
    found = _answer_tag(visible)
    if found is not None:
        return Extraction(found, "answer_tag")
    found = _last_boxed(visible)
    if found:
        return Extraction(found, "boxed")
    found = _answer_is(visible)
    if found is not None:
        return Extraction(found, "answer_is")
    found = _last_line(visible)
    if found is not None:
        return Extraction(found, "last_line")
    return None
