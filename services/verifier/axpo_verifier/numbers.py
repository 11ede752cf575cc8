"""Read one number out of an answer such as ``"$1,234.5"``, ``"45%"``, ``"\\dfrac{3}{4}"`` or
``"forty-two apples"``.

Hand-written because math-verify (used for LaTeX math in :mod:`axpo_verifier.mathcheck`) reads
these answers differently (math-verify 0.9.0: ``"forty-two"``/``"a dozen"`` -> nothing,
``"3 to 5"`` -> 5 where an ambiguous answer must fail, ``"1 1/2"`` -> 1, ``"45%"`` -> 0.45).

Rules (all linear-time: bounded regexes and single scans, no ``eval``):

* **One number.** The text must hold exactly one numeric literal; words around it (units,
  nouns: ``"There are 7 apples"``, ``"12 cm"``, ``"30 degrees"``) are ignored. Two literals
  (``"3 to 5"``, ``"1, 2"``, ``"2^3"``) give None. When there is no digit at all, number words
  are read (``"seven"``, ``"forty-two"``, ``"one hundred and five"``, ``"a dozen"``, ``"zero"``);
  again exactly one run of number words must be present. Digits win over words
  (``"7 (seven)"`` is 7).
* **Thousands separators.** A comma is a thousands separator only in the strict pattern
  ``d{1,3}(,ddd)+`` (``"1,234,567"``, ``"1,234.5"``). Anything else splits numbers: ``"1,5"``,
  ``"1,50"``, ``"12,34,567"`` and ``"1, 2"`` are lists, hence None, unless decimal commas
  are asked for (below); ``"1,500"`` is always 1500. Spaces never
  group digits (``"1 234"`` is two numbers), nor do periods (``"1.234.567"`` is malformed).
  LaTeX ``{,}`` and ``\\,`` inside a number are removed first (``"1{,}000"`` and ``"1\\,000"``
  are 1000).
* **Decimal commas**, only when asked (``decimal_comma=True``; the number checker asks when the
  gold is not an integer): a comma between digits followed by one or two digits and no more
  (``"1,5"``, ``"1,22"``, ``"1000,99"``) is a decimal point. Three digits after a comma are
  always a thousands group, so ``"1,234"`` is 1234 whatever the gold; ``"1,22"`` against the
  gold 122 stays a list (None).
* **Decimals and signs.** ``".5"``, ``"-.5"``, ``"5."``; ``-``, ``+`` and the Unicode minus
  U+2212 (also en dash and figure dash) directly before the number, when not glued to a
  preceding letter or digit (``"COVID-19"`` is 19). ``"minus 5"``/``"negative 5"`` are -5.
* **Scientific notation.** ``1.2e3``, ``1.2×10^3``, ``1.2 x 10^3``, ``1.2*10^{3}``,
  ``1.2 \\times 10^{3}``, ``1.2 \\cdot 10^{-3}``, and a bare ``10^{3}``.
* **Fractions.** ``3/4``, ``\\frac{3}{4}``, ``\\dfrac12``, ``-\\tfrac{1}{2}``, and mixed numbers
  ``"1 1/2"`` / ``"1\\frac{1}{2}"`` (an integer, whitespace, a proper fraction). Division by zero
  gives None.
* **Percent.** ``"45%"``, ``"45\\%"``, ``"45 percent"`` read as 45 with ``percent=True`` (the
  checker decides what the sign means).
* **Scale words** after a literal: ``thousand``, ``million``, ``billion``, ``trillion``.
* **Wrappers.** ``$...$``, ``\\(...\\)``, ``\\text{}``, ``\\mathrm{}``, ``\\textbf{}``,
  ``\\boxed{}``, ``\\left``/``\\right``, currency signs and codes (``$ € £ ¥ ₹``, ``USD`` ...),
  degree signs (``°``, ``^\\circ``) are ignored.
* **Not plain numbers.** ``\\sqrt``, ``\\pi``, ``π``, ``√``, ``\\infty``, ``\\log``, fraction
  words (``half``, ``third``, ``quarter``) and a remaining ``^`` (other than ``10^k``) give
  None: the value is not the literal.
* Results that are not finite give None.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["ParsedNumber", "parse_number", "parse_number_ex"]


@dataclass(frozen=True)
class ParsedNumber:
    """A number read from text; ``percent`` when it carried a percent sign or word."""

    value: float
    percent: bool = False


# --------------------------------------------------------------------------- preprocessing

_MINUS_SIGNS = {0x2212: "-", 0x2012: "-", 0x2013: "-", 0xFE63: "-", 0xFF0D: "-"}
_CURRENCY = re.compile(
    r"\\\$|[$€£¥₹₩₽¢]|\b(?:usd|eur|gbp|jpy|cny|rmb|inr|dollars?|euros?|pounds?|yen|yuan)\b"
)
# \text{...}-like wrappers: drop the command name, keep the braces' content
_WRAPPER = re.compile(
    r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname|boxed|fbox|"
    r"displaystyle|left|right|big|bigg|Big|Bigg)\b"
)
_FRAC = re.compile(
    r"\\[dt]?frac\s{0,8}(?:\{\s{0,8}([^{}]{0,64}?)\s{0,8}\}|(\d))"
    r"\s{0,8}(?:\{\s{0,8}([^{}]{0,64}?)\s{0,8}\}|(\d))"
)
_CIRC = re.compile(r"\^\s{0,4}\{?\s{0,4}\\circ\s{0,4}\}?|\\circ|\\degree|°|º")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\{,\}|~")
_NOT_PLAIN = re.compile(
    r"\\(?:sqrt|pi|infty|log|ln|exp|sin|cos|tan|sum|int|prod)\b|[π√∞]"
    r"|\b(?:half|halves|quarters?|thirds?)\b"
)


def _preprocess(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_MINUS_SIGNS)
    text = text.replace("\u2044", "/").lower()  # NFKC turns "½" into "1⁄2"
    text = _CURRENCY.sub(lambda m: " " if m.group()[-1].isalpha() else "", text)
    text = text.replace("\\%", "%").replace("\\times", "×").replace("\\cdot", "×")
    text = _WRAPPER.sub("", text)
    text = _CIRC.sub(" ", text)
    text = _LATEX_SPACE.sub(lambda m: "," if m.group() == "{,}" else "", text)
    text = _FRAC.sub(_frac_to_slash, text)
    text = text.replace("\\(", " ").replace("\\)", " ").replace("\\[", " ").replace("\\]", " ")
    return text.replace("{", " ").replace("}", " ")


def _frac_to_slash(m: re.Match[str]) -> str:
    num = m.group(1) if m.group(1) is not None else m.group(2)
    den = m.group(3) if m.group(3) is not None else m.group(4)
    glue = " " if m.start() > 0 and m.string[m.start() - 1].isdigit() else ""
    return f"{glue}{num.strip()}/{den.strip()} "


# --------------------------------------------------------------------------- literals

_LITERAL = re.compile(
    r"(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:e[-+]?\d{1,4})?"
)
_SIGN_BEFORE = re.compile(r"(?:(?<![\w.])[-+]|\b(?:minus|negative)\s{1,4})$")
_SCI = re.compile(r"\s{0,4}[×x*]\s{0,4}10\s{0,4}\^\s{0,4}\(?\s{0,4}([-+]?\d{1,4})\s{0,4}\)?")
_POW10 = re.compile(r"\s{0,4}\^\s{0,4}\(?\s{0,4}([-+]?\d{1,4})\s{0,4}\)?")
_SLASH = re.compile(r"\s{0,4}/\s{0,4}([-+]?)")
_PERCENT = re.compile(r"\s{0,4}(?:%|per\s?cent\b)")
_SCALE = re.compile(r"\s{0,4}(thousand|million|billion|trillion)\b")
_MALFORMED_AFTER = re.compile(r"\.\d")
_SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}


@dataclass
class _Token:
    start: int
    end: int
    value: float
    integer: bool  # a plain integer literal, no fraction/exponent/percent
    fraction: tuple[float, float] | None = None
    percent: bool = False


def _literal_value(text: str) -> float:
    return float(text.replace(",", ""))


def _tokens(text: str, limit: int = 3) -> list[_Token] | None:
    """The numbers in ``text`` (at most ``limit``); None when one is malformed (a zero
    denominator, ``1.2.3``)."""
    tokens: list[_Token] = []
    pos = 0
    while len(tokens) < limit:
        m = _LITERAL.search(text, pos)
        if m is None:
            break
        start, end = m.start(), m.end()
        lit = m.group()
        value = _literal_value(lit)
        integer = lit.replace(",", "").isdigit()
        sign = _SIGN_BEFORE.search(text, max(0, start - 12), start)
        if sign is not None and sign.group().startswith(("-", "minus", "negative")):
            value = -value
        if sign is not None:
            start = sign.start()
        fraction: tuple[float, float] | None = None
        percent = False
        sci = _SCI.match(text, end)
        pow10 = _POW10.match(text, end) if lit == "10" and sci is None else None
        slash = _SLASH.match(text, end)
        if sci is not None:
            value *= 10.0 ** int(sci.group(1))
            integer, end = False, sci.end()
        elif pow10 is not None:
            value = math.copysign(10.0 ** int(pow10.group(1)), value)
            integer, end = False, pow10.end()
        elif slash is not None:
            den_m = _LITERAL.match(text, slash.end())
            if den_m is not None and "e" not in lit and "e" not in den_m.group():
                den = _literal_value(den_m.group())
                if slash.group(1) == "-":
                    den = -den
                if den == 0:
                    return None
                fraction = (value, den)
                value = value / den
                integer, end = False, den_m.end()
        scale = _SCALE.match(text, end)
        if scale is not None:
            value *= _SCALES[scale.group(1)]
            integer, end = False, scale.end()
        pct = _PERCENT.match(text, end)
        if pct is not None:
            percent, integer, end = True, False, pct.end()
        if _MALFORMED_AFTER.match(text, end):
            return None
        tokens.append(_Token(start, end, value, integer, fraction, percent))
        pos = end
    return tokens


def _merge_mixed(text: str, tokens: list[_Token]) -> list[_Token]:
    """``1 1/2`` -> 1.5: an integer, whitespace only, then a proper positive fraction."""
    if len(tokens) != 2:
        return tokens
    whole, frac = tokens
    if not (whole.integer and frac.fraction is not None and not frac.percent):
        return tokens
    num, den = frac.fraction
    if not (0 < num < den) or text[whole.end : frac.start].strip():
        return tokens
    value = abs(whole.value) + num / den
    return [_Token(whole.start, frac.end, math.copysign(value, whole.value), False)]


# --------------------------------------------------------------------------- words

_UNITS = {
    w: i
    for i, w in enumerate(
        (
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        )
    )
}
_TENS = {
    w: 10 * (i + 2)
    for i, w in enumerate(
        ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
    )
}
_BIG = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_WORD = re.compile(r"[a-z]+")


_SCALE_WORDS = ("hundred", "dozen", "thousand", "million", "billion")


def _is_number_word(w: str) -> bool:
    return w in _UNITS or w in _TENS or w in _BIG or w in ("hundred", "dozen")


def _word_runs(text: str) -> list[list[str]]:
    """Maximal runs of number words; "and" joins two number words, a leading "a" counts
    before a scale word ("a dozen", "a hundred")."""
    runs: list[list[str]] = []
    current: list[str] = []
    pending_and = pending_a = False
    for m in _WORD.finditer(text):
        w = m.group()
        if _is_number_word(w):
            if current and pending_and:
                current.append("and")
            elif not current and pending_a and w in _SCALE_WORDS:
                current.append("a")
            current.append(w)
            pending_and = pending_a = False
        elif w == "and" and current and not pending_and:
            pending_and = True
        else:
            if current:
                runs.append(current)
                current = []
                if len(runs) > 1:
                    return runs
            pending_and = False
            pending_a = w == "a"
    if current:
        runs.append(current)
    return runs


def _run_value(words: list[str]) -> float | None:
    """Value of one run of number words; None when the words do not form a number
    ("one two", "twenty thirty", "zero five")."""
    total = 0
    group = 0  # the part below the current scale word
    last = ""  # category of the previous word
    last_scale = math.inf
    for w in words:
        if w == "and":
            if last not in ("hundred", "scale"):
                return None
            continue
        if w == "a":
            group, last = 1, "unit"
        elif w == "zero":
            if len(words) != 1:
                return None
            last = "unit"
        elif w in _UNITS:
            value = _UNITS[w]
            kind = "unit" if value < 10 else "teen"
            if last not in ("", "tens", "hundred", "scale") or (last == "tens" and kind == "teen"):
                return None
            group += value
            last = kind
        elif w in _TENS:
            if last not in ("", "hundred", "scale"):
                return None
            group += _TENS[w]
            last = "tens"
        elif w == "hundred":
            if last not in ("", "unit", "teen") or group >= 100:
                return None
            group = (group or 1) * 100
            last = "hundred"
        elif w == "dozen":
            if last not in ("", "unit", "teen", "tens"):
                return None
            group = (group or 1) * 12
            last = "dozen"
        else:
            scale = _BIG[w]
            if last == "scale" or scale >= last_scale:
                return None
            total += (group or 1) * scale
            group, last, last_scale = 0, "scale", scale
    return float(total + group) if last else None


def _words_value(text: str) -> float | None:
    """The value of the only run of number words in ``text``, or None."""
    runs = _word_runs(text)
    if len(runs) != 1:
        return None
    return _run_value(runs[0])


# --------------------------------------------------------------------------- API


_DECIMAL_COMMA = re.compile(r"(?<![\d,.])(\d+),(\d{1,2})(?![\d,.])")


def parse_number_ex(text: str, *, decimal_comma: bool = False) -> ParsedNumber | None:
    """The single number in ``text`` with its percent flag, or None (see module docstring)."""
    if not text:
        return None
    text = _preprocess(text)
    if decimal_comma and "," in text:
        text = _DECIMAL_COMMA.sub(r"\1.\2", text)
    if _NOT_PLAIN.search(text):
        return None
    tokens = _tokens(text)
    if tokens is None:
        return None
    tokens = _merge_mixed(text, tokens)
    if len(tokens) > 1:
        return None
    if tokens:
        tok = tokens[0]
        rest = text[: tok.start] + " " + text[tok.end :]
        if "^" in rest:
            return None
        if not math.isfinite(tok.value):
            return None
        return ParsedNumber(tok.value + 0.0, tok.percent)
    value = _words_value(text)
    if value is None:
        return None
    negative = re.search(r"\b(?:minus|negative)\s{1,4}[a-z]", text) is not None
    percent = re.search(r"\bper\s?cent\b", text) is not None
    return ParsedNumber(-value if negative else value, percent)


def parse_number(text: str) -> float | None:
    """The single number in ``text``, or None.

    >>> parse_number("There are 7 apples")
    7.0
    >>> parse_number("1,234,567")
    1234567.0
    >>> parse_number("1,5") is None
    True
    >>> parse_number("-\\\\dfrac12")
    -0.5
    """
    parsed = parse_number_ex(text)
    return None if parsed is None else parsed.value
