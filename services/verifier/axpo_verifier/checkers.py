"""Compare an extracted answer with the gold answer: multiple choice, numbers, short text.

All checkers are linear-time and never raise on odd input; the math checker lives in
:mod:`axpo_verifier.mathcheck` because it needs killable worker processes.

Multiple choice (:func:`check_choice`)
    The answer's option is found by the first of these rules that finds anything:

    1. the whole answer is a letter form, case-insensitive: ``B``, ``(B)``, ``[B]``, ``B.``,
       ``B)``, ``B:``, ``Option B``, ``option (b)``, ``Choice C``, optionally after a lead-in
       such as ``The answer is`` / ``Answer:`` / ``The correct option is`` and with markdown
       (``**B**``), ``$``, ``\\text{}`` removed;
    2. the answer starts with a letter followed by a delimiter and the option text:
       ``B. 42 apples``, ``(B) 42``, ``b) 42``, ``B: 42``. The delimiter is required, so ``A cat``
       is not option A. The rest must not name another option;
    3. (choices given) the answer, normalized like :func:`check_text`, equals one option's text;
    4. explicit markers anywhere: ``(B)``/``[B]`` (not glued to a word, so ``f(x)`` is no
       marker), ``option B``/``choice B``, ``answer is B``/``answer: B``, and letter lists
       ``A or B``, ``A, C``, ``B and D``, ``A/B`` (upper-case letters);
    5. bare upper-case letters standing alone (``I pick B``): ``A`` and ``I`` followed by a
       lower-case word are the article and the pronoun, not options (``A cat``, ``I think``),
       except ``A`` before a verb (``A is correct``, ``A would be right``) and ``I is/was``;
       letters in abbreviations (``U.S.``) or glued to words/digits/hyphens do not count;
    6. (choices given) the answer holds a single number equal to exactly one option's number.

    A rule that finds two or more distinct options makes the answer wrong ("names several
    options"). With choices, only the first ``len(choices)`` letters are options.

    The gold answer is a letter form, or (with choices) an option's text or number. A gold that
    is neither, with no choices, is compared as text.

Numbers (:func:`check_number`)
    Correct iff ``|a - g| <= max(abs_tol, rel_tol * |g|)`` (plus 1e-9 relative slack for float
    rounding, so 57% vs 0.6 at 5 % is in), numbers read by
    :func:`axpo_verifier.numbers.parse_number_ex`.

    Percent rule (ChartQA convention): a percent sign licenses a factor of 100. When exactly
    one side carries ``%`` (or "percent"), the answer also matches if its value read the other
    way matches: ``"45%"`` equals gold ``"45"`` and gold ``"0.45"``; answer ``"0.45"`` equals gold
    ``"45%"``. With no percent sign anywhere, ``0.45`` and ``45`` differ.

Text (:func:`check_text`)
    Equal after NFKC, case folding, markdown/``$``/``\\text{}`` removal, punctuation turned into
    spaces, whitespace collapsed, and one leading article (a, an, the) dropped. Two plain
    numbers equal as numbers (``3.0`` and ``3``) also match.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from axpo_verifier.extract import clean_text
from axpo_verifier.numbers import parse_number, parse_number_ex

__all__ = [
    "Verdict",
    "check_choice",
    "check_number",
    "check_text",
    "format_value",
    "normalize_text",
]


@dataclass(frozen=True)
class Verdict:
    """A checker's decision, why, and the answer as the checker read it."""

    correct: bool
    reason: str
    normalized: str | None


# --------------------------------------------------------------------------- text

_LATEX_WRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|boxed)\b")
_NON_WORD = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def _unwrap(text: str) -> str:
    """Clean control characters, NFKC, drop markdown emphasis, ``$`` and LaTeX text wrappers."""
    text = unicodedata.normalize("NFKC", clean_text(text))
    if "\\" in text:
        text = _LATEX_WRAP.sub("", text)
        text = text.replace("\\{", "\x00").replace("\\}", "\x01")
        text = text.replace("{", "").replace("}", "").replace("\x00", "{").replace("\x01", "}")
    return text.replace("**", "").replace("__", "").replace("`", "").replace("$", "").strip()


def normalize_text(text: str) -> str:
    """The comparison form of a short text answer (see the module docstring)."""
    text = _unwrap(text).casefold()
    text = _SPACES.sub(" ", _NON_WORD.sub(" ", text)).strip()
    return _ARTICLE.sub("", text)


def check_text(answer: str, gold: str) -> Verdict:
    """Normalized exact match (see the module docstring)."""
    a, g = normalize_text(answer), normalize_text(gold)
    if not g:
        return Verdict(False, "gold answer is empty", a)
    if a == g:
        return Verdict(True, f"text {_show(a)} == gold {_show(g)}", a)
    a_raw, g_raw = _unwrap(answer), _unwrap(gold)
    if (
        _PLAIN_NUMBER.fullmatch(a_raw)
        and _PLAIN_NUMBER.fullmatch(g_raw)
        and float(a_raw) == float(g_raw)
    ):
        return Verdict(True, f"text {_show(a_raw)} == gold {_show(g_raw)} as numbers", a)
    return Verdict(False, f"text {_show(a)} != gold {_show(g)}", a)


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


# --------------------------------------------------------------------------- numbers


def format_value(x: float) -> str:
    """A number for people: integers without ``.0``, others in shortest repr."""
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def check_number(answer: str, gold: str, rel_tol: float, abs_tol: float) -> Verdict:
    """Numeric match within ``max(abs_tol, rel_tol * |gold|)``, with the percent rule."""
    g = parse_number_ex(gold)
    if g is None:
        return Verdict(False, f"gold {_show(gold)} is not a single number", None)
    # A non-integer gold admits a decimal comma in the answer ("1,22" for 1.22, never "1,234").
    a = parse_number_ex(answer, decimal_comma=not g.value.is_integer())
    if a is None:
        return Verdict(False, "no single number in answer", None)
    tol = max(abs_tol, rel_tol * abs(g.value))
    candidates = [(a.value, "")]
    if a.percent and not g.percent:
        candidates.append((a.value / 100.0, " (percent read as fraction)"))
    elif g.percent and not a.percent:
        candidates.append((a.value * 100.0, " (fraction read as percent)"))
    shown_a = format_value(a.value) + ("%" if a.percent else "")
    shown_g = format_value(g.value) + ("%" if g.percent else "")
    tols = f"rel_tol {rel_tol:g}, abs_tol {abs_tol:g}"
    for value, how in candidates:
        # the bound is inclusive; float noise (0.6 - 0.57 > 0.05 * 0.6) is forgiven
        if abs(value - g.value) <= tol + 1e-9 * max(abs(value), abs(g.value), 1e-300):
            return Verdict(True, f"number {shown_a} == gold {shown_g}{how} ({tols})", shown_a)
    return Verdict(False, f"number {shown_a} != gold {shown_g} ({tols})", shown_a)


# --------------------------------------------------------------------------- choices

_LEAD_IN = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\s{0,4},?\s{1,4})?(?:the\s{1,4})?"
    r"(?:final\s{1,4}|correct\s{1,4}|best\s{1,4}|right\s{1,4})?(?:answer|option|choice)"
    r"(?:\s{1,4}is)?\s{0,4}(?:[:：]\s{0,4}|(?=[\s(\[]))\s{0,4}",
    re.IGNORECASE,
)
_WHOLE_LETTER = re.compile(r"[\(\[]?\s{0,4}([A-Za-z])\s{0,4}[\)\]]?\s{0,4}[.:)]?")
_LEADING_LETTER = re.compile(r"(?:[\(\[]([A-Za-z])[\)\]]|([A-Za-z])[.:)])\s{0,4}(.*)", re.DOTALL)
_MARKERS = re.compile(
    # (B) or [B], not glued to a word as in f(x)
    r"(?<![A-Za-z0-9])[\(\[]([A-Za-z])[\)\]]"
    # option B, choice (c)
    r"|(?i:\b(?:option|choice)s?)\s{0,4}[\(\[]?\s{0,4}([A-Za-z])(?![A-Za-z0-9])"
    # answer is B, answer: b.
    r"|(?i:\banswer)\s{0,4}(?:(?i:is)|[:：])\s{0,4}[\(\[]?\s{0,4}"
    r"([A-Z](?![A-Za-z0-9])|[a-z](?=[.,;:!)\]]|\s{0,4}$))"
    # A or B, A, C, B and D, A/B
    r"|(?<![A-Za-z0-9])([A-Z])\s{0,4}(?:,|/|&|\bor\b|\band\b)\s{0,4}[\(\[]?\s{0,4}"
    r"([A-Z])(?![A-Za-z0-9])"
)
_BARE_LETTER = re.compile(r"(?<![A-Za-z0-9'’.\-])([A-Z])(?![A-Za-z0-9'’\-])(?!\.[A-Za-z])")
_ARTICLE_AFTER = re.compile(r"\s{1,4}[a-z]")
# "A is correct" / "I is right": a letter, not the article or the pronoun
_LETTER_VERB_AFTER = re.compile(
    r"\s{1,4}(?:is|was|seems|appears|looks|matches|fits)\b|\s{1,4}(?:would|should|must|will|can)\b"
    r"(?=\s{1,4}be\b)"
)
_CHOICE_PREFIX = re.compile(r"^\s{0,4}[\(\[]?([A-Za-z])[\)\].:]\s{1,4}")
_MAX_LEAD_INS = 3


def _letters(n_choices: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: n_choices or 26]


def _strip_lead_in(text: str) -> str:
    text = text.strip()
    for _ in range(_MAX_LEAD_INS):
        m = _LEAD_IN.match(text)
        if m is None or m.end() == 0:
            break
        text = text[m.end() :].strip()
    return text.rstrip(" .!。").strip()


def _whole_letter(text: str) -> str | None:
    m = _WHOLE_LETTER.fullmatch(text)
    return None if m is None else m.group(1).upper()


def _marker_letters(text: str, valid: str) -> set[str]:
    found: set[str] = set()
    for m in _MARKERS.finditer(text):
        for group in m.groups():
            if group and group.upper() in valid:
                found.add(group.upper())
    return found


def _bare_letters(text: str, valid: str) -> set[str]:
    found: set[str] = set()
    for m in _BARE_LETTER.finditer(text):
        letter = m.group(1)
        if letter in "AI" and _ARTICLE_AFTER.match(text, m.end()):
            verb = _LETTER_VERB_AFTER.match(text, m.end())
            if verb is None or (
                letter == "I" and not verb.group().strip().startswith(("is", "was"))
            ):
                continue
        if letter in valid:
            found.add(letter)
    return found


def _option_texts(choices: Sequence[str]) -> list[str]:
    """Normalized option texts, with a leading ``(A)``/``A.`` label of their own removed."""
    out = []
    for i, choice in enumerate(choices):
        m = _CHOICE_PREFIX.match(choice)
        if m is not None and m.group(1).upper() == _letters(0)[i % 26]:
            choice = choice[m.end() :]
        out.append(normalize_text(choice))
    return out


def _letter_of_text(text: str, options: list[str]) -> str | None:
    norm = normalize_text(text)
    if not norm:
        return None
    for i, option in enumerate(options):
        if option == norm:
            return _letters(0)[i]
    return None


def _letter_of_number(text: str, choices: Sequence[str]) -> str | None:
    value = parse_number(text)
    if value is None:
        return None
    hits = [
        i
        for i, choice in enumerate(choices)
        if (v := parse_number(choice)) is not None and abs(v - value) <= 1e-9 * max(1.0, abs(v))
    ]
    return _letters(0)[hits[0]] if len(hits) == 1 else None


def _answer_option(answer: str, choices: Sequence[str]) -> tuple[set[str], str]:
    """The options the answer names, and the rule that found them."""
    valid = _letters(len(choices))
    options = _option_texts(choices) if choices else []
    text = _unwrap(answer)
    core = _strip_lead_in(text)
    letter = _whole_letter(core)
    if letter is not None:  # an out-of-range letter is still this answer's option (a wrong one)
        return {letter}, "letter"
    m = _LEADING_LETTER.fullmatch(core)
    if m is not None:
        letter = (m.group(1) or m.group(2)).upper()
        rest = m.group(3)
        if letter in valid:
            found = {letter} | _marker_letters(rest, valid)
            other = _letter_of_text(rest, options) if options else None
            if other is not None:
                found.add(other)
            return found, "letter with option text"
    if options:
        letter = _letter_of_text(core, options) or _letter_of_text(text, options)
        if letter is not None:
            return {letter}, "option text"
    found = _marker_letters(text, valid)
    if found:
        return found, "option marker"
    found = _bare_letters(text, valid)
    if found:
        return found, "letter"
    if choices:
        letter = _letter_of_number(core, choices)
        if letter is not None:
            return {letter}, "option number"
    return set(), ""


def _gold_letter(gold: str, choices: Sequence[str]) -> str | None:
    valid = _letters(len(choices))
    text = _unwrap(gold)
    core = _strip_lead_in(text)
    letter = _whole_letter(core)
    if letter is None and (m := _LEADING_LETTER.fullmatch(core)) is not None:
        letter = (m.group(1) or m.group(2)).upper()
    if letter is not None and letter in valid:
        return letter
    if choices:
        return _letter_of_text(text, _option_texts(choices)) or _letter_of_number(text, choices)
    return None


def check_choice(answer: str, gold: str, choices: Sequence[str] = ()) -> Verdict:
    """Multiple-choice match (see the module docstring for the rules)."""
    gold_letter = _gold_letter(gold, choices)
    if gold_letter is None:
        if choices:
            return Verdict(False, f"gold {_show(gold)} is neither a letter nor an option", None)
        verdict = check_text(answer, gold)
        return Verdict(
            verdict.correct, "gold is not a letter; " + verdict.reason, verdict.normalized
        )
    found, how = _answer_option(answer, choices)
    if not found:
        return Verdict(False, "no option found in answer", None)
    if len(found) > 1:
        names = ", ".join(sorted(found))
        return Verdict(False, f"answer names several options ({names})", names)
    (letter,) = found
    if letter == gold_letter:
        return Verdict(True, f"choice {letter} == gold {gold_letter} (by {how})", letter)
    return Verdict(False, f"choice {letter} != gold {gold_letter} (by {how})", letter)
