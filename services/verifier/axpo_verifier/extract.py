"""Find the answer in a model output.

Outputs look like Qwen3-VL-Thinking generations::

    <think>reasoning</think>

    visible text, maybe <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks

The opening ``<think>`` may be missing (the chat template puts it in the prompt): text before a
``</think>`` that has no matching ``<think>`` is thinking. A ``<think>`` that is never closed
makes the rest of the output thinking. Text inside thinking never counts as the answer.

A model that runs past its turn leaves template text behind: everything from an
``<|endoftext|>``, and from the last ``<|im_start|>`` when it opens a turn other than the
assistant's (``<|im_start|>user``), is not the model's answer and is dropped first.

In the visible part, with tool-call and tool-response blocks and chat special tokens removed,
the answer is, in this order of priority:

1. the content of the last ``<answer>...</answer>`` (an unclosed last ``<answer>`` runs to the
   end); a ``\\boxed{}`` inside it is unwrapped;
2. the last complete ``\\boxed{...}`` or ``\\fbox{...}``; when several boxes end the answer,
   separated only by commas, semicolons, spaces, ``$``, ``\\quad`` or "and"
   (``\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}``), their contents joined
   with ", " (up to 64 boxes); but a stated final answer that comes *after* the last box wins
   (an intermediate ``\\boxed{255}`` followed by "The final answer is 10,455");
3. what follows the last "the answer is" / "answer:" / "final answer:" (case-insensitive) up to
   the end of its line (or the next non-empty line when that is empty), cut at the end of the
   first sentence, markdown bold and a trailing period removed;
4. the last non-empty line; when the output ends with display math over several lines
   (``\\[`` ... ``\\]`` or ``$$`` ... ``$$``), the content of that block.

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
    "drop_run_past",
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


_END_OF_TEXT = "<|endoftext|>"
_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"


def drop_run_past(output: str) -> str:
    """The model's own turn: cut at ``<|endoftext|>``, at a last ``<|im_start|>`` that opens a
    turn other than the assistant's (a model running on into ``<|im_start|>user``), and at the
    ``<|im_end|>`` that closes the last assistant turn. Earlier turns of a transcript (tool
    calls and responses) are kept."""
    if "<|" not in output:
        return output
    cut = output.find(_END_OF_TEXT)
    if cut >= 0:
        output = output[:cut]
    start = output.rfind(_IM_START)
    if start >= 0 and not output.startswith("assistant", start + len(_IM_START)):
        output = output[:start]
        start = output.rfind(_IM_START)
    end = output.find(_IM_END, max(start, 0))
    return output if end < 0 else output[:end]


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
    boxed = _last_box(content, len(content)) if _has_box(content) else None
    if boxed is not None:
        content = boxed.content
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


@dataclass(frozen=True)
class _Box:
    start: int  # the backslash of the command
    stop: int  # just after the closing brace (or the bare token)
    content: str


def _has_box(text: str) -> bool:
    return "\\boxed" in text or "\\fbox" in text


def _last_box(text: str, end: int) -> _Box | None:
    """The last complete ``\\boxed{...}``/``\\fbox{...}`` (or ``\\boxed 5``) that starts before
    ``end`` and closes by it."""
    for _ in range(_MAX_BOX_TRIES):
        start, after = _last_box_command(text, end)
        if start < 0:
            return None
        j = after
        while j < end and text[j] in " \t":
            j += 1
        if j < end and text[j] == "{":
            close = _match_braces(text, j)
            if 0 <= close < end:
                return _Box(start, close + 1, text[j + 1 : close].strip())
        elif after < j < end:
            # "\boxed 5": one token up to whitespace or "$"
            k = j
            while k < end and not text[k].isspace() and text[k] != "$":
                k += 1
            if k > j:
                return _Box(start, k, text[j:k])
        end = start
    return None


# What may stand between boxes that together form one answer: "\boxed{1}, \boxed{2}",
# "$\boxed{(2, 2)}$ \quad \text{and} \quad $\boxed{(6, 2)}$". Prose ends the run.
_BOX_SEPARATOR = re.compile(
    r"(?:\s|[,;$&]|\\q?quad\b|\\[,;: ()\[\]]|\band\b"
    r"|\\(?:text|textrm|mathrm)\s{0,4}\{\s{0,4}(?:,|and)?\s{0,4}\})*"
)
_MAX_BOXES = 64
_SEPARATOR_CHARS = " \t\n,;$&"
_SEPARATOR_ENDS = ("}", "quad", "and", "\\(", "\\[", "\\)", "\\]", "\\,", "\\;", "\\:", "\\")


def _box_run(text: str) -> tuple[str, int] | None:
    """The answer in boxes and where the last box ends: the last box's content, or the
    contents of the boxes that end the text one after another with only separators between
    them, joined with ", " (see the module docstring)."""
    if not _has_box(text):
        return None
    last = _last_box(text, len(text))
    if last is None:
        return None
    run = [last]
    while len(run) < _MAX_BOXES:
        # Cheap test first: a box just before would end in "}" and a separator (most texts
        # have one box, and this saves searching all the text before it).
        before = text[max(0, run[-1].start - 64) : run[-1].start].rstrip(_SEPARATOR_CHARS)
        if not before.endswith(_SEPARATOR_ENDS):
            break
        prev = _last_box(text, run[-1].start)
        if prev is None or not _BOX_SEPARATOR.fullmatch(text, prev.stop, run[-1].start):
            break
        run.append(prev)
    contents = [b.content for b in reversed(run) if b.content]
    return ", ".join(contents), last.stop


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


_DISPLAY_OPEN = {"\\]": "\\[", "$$": "$$"}


def _last_line(visible: str) -> str | None:
    end = len(visible)
    while end > 0:
        nl = visible.rfind("\n", 0, end)
        line = _tidy(visible[nl + 1 : end])
        if line:
            return _display_block(visible, end) or line
        end = nl if nl >= 0 else 0
    return None


def _display_block(visible: str, end: int) -> str | None:
    """When ``visible[:end]`` ends with a display-math closer on a line of its own (``\\]`` or
    ``$$``), the block's content on one line; else None."""
    text = visible[:end].rstrip().rstrip(".").rstrip()
    for close, open_ in _DISPLAY_OPEN.items():
        if not text.endswith(close):
            continue
        body_end = len(text) - len(close)
        start = text.rfind(open_, 0, body_end)
        if start < 0 or "\n" not in text[start:body_end]:
            return None  # one-line math: the checkers read its delimiters themselves
        content = " ".join(text[start + len(open_) : body_end].split())
        return _tidy(content) or None
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


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def extract_answer(output: str, trace: list[str] | None = None) -> Extraction | None:
    """The answer in ``output`` (see the module docstring), or None when there is none. With
    ``trace``, each step appends one line saying what it saw (``axpo verify --explain``).

    >>> extract_answer("<think>maybe 3</think>The answer is 4.")
    Extraction(text='4', source='answer_is')
    """
    # Every trace line is built under `if trace is not None`: scoring pays nothing for it.
    if not output or not (output := clean_text(output)).strip():
        if trace is not None:
            trace.append("output: empty")
        return None
    turn = drop_run_past(output)
    if trace is not None and len(turn) < len(output):
        dropped = output[len(turn) :].strip()
        trace.append(f"turn: dropped {len(output) - len(turn)} chars: {_short(dropped)}")
    thinking, visible = split_thinking(turn)
    if trace is not None:
        trace.append(f"thinking: {len(thinking)} chars, never the answer")
    stripped = strip_tool_blocks(visible)
    if trace is not None and stripped != visible:
        trace.append("visible: tool-call/tool-response blocks and special tokens removed")
    visible = stripped
    if not visible.strip():
        if trace is not None:
            trace.append("visible: empty, no answer")
        return None
    found = _answer_tag(visible)
    if trace is not None:
        trace.append(f"rule 1 <answer>: {_short(found) if found is not None else 'none'}")
    if found is not None:
        return Extraction(found, "answer_tag")
    boxed = _box_run(visible)
    if boxed is not None and boxed[0]:
        if trace is not None:
            trace.append(f"rule 2 \\boxed: {_short(boxed[0])}")
        # A final answer stated after the last box overrides it (the box was a step).
        after = _answer_is(visible[boxed[1] :])
        if after is not None:
            if trace is not None:
                trace.append(f"rule 3 'the answer is' after the last box wins: {_short(after)}")
            return Extraction(after, "answer_is")
        return Extraction(boxed[0], "boxed")
    stated = _answer_is(visible)
    if trace is not None:
        trace.append("rule 2 \\boxed: none")
        trace.append(f"rule 3 'the answer is': {_short(stated) if stated else 'none'}")
    if stated is not None:
        return Extraction(stated, "answer_is")
    found = _last_line(visible)
    if trace is not None:
        shown = _short(found) if found is not None else "none"
        trace.append(f"rule 4 last line (or closing display math): {shown}")
    if found is not None:
        return Extraction(found, "last_line")
    return None
