"""Score batches of model outputs: extraction, checking, format score, reward composition.

:meth:`Verifier.score` handles one batch. Choice, number and text items are checked in the
calling thread (all linear-time); math items are submitted to the :class:`MathChecker` pool
together and then collected, each bounded by its own time limit (``item.time_limit_s`` or
``settings.default_time_limit_s``), counted from when a worker starts it. A math item still
queued behind other work after ``queue_wait_s`` is given up as timed out as well.

Per item:

* an output longer than ``settings.max_output_chars`` scores 0 and is not read;
* otherwise ``format`` comes from :func:`format_score`, the answer from :func:`extract_answer`
  (none: incorrect, "no answer found"), and correctness from the item's checker;
* ``total = accuracy * w.accuracy + format * w.format + tool_bonus * w.tool_bonus`` where
  ``tool_bonus`` is 1 only for a correct answer with ``item.tool_calls > 0``;
* a math check past its time limit is incorrect with ``timed_out=True``; its format still counts;
* any exception while checking one item gives that item a reward of 0 with the error named in
  the reason; the rest of the batch is scored normally.

``Reward.extracted`` is the answer as the checker read it (``Verdict.normalized``: the option
letter ``"B"`` for ``"The answer is (B)."``, the number ``"7"`` for ``"There are 7 apples"``, the
normalized text, the LaTeX math-verify parsed) or, when the checker read nothing, the extracted
answer text; None when no answer was found. It is cut to ``EXTRACTED_MAX_CHARS`` characters.
A :class:`Verifier` is thread-safe: several threads may call :meth:`score` at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from axpo.contracts.domain import AnswerKind, Reward, RewardWeights, ScoreItem
from axpo.settings.verifier import VerifierSettings
from axpo_verifier.checkers import Verdict, check_choice, check_number, check_text
from axpo_verifier.extract import Extraction, extract_answer
from axpo_verifier.formatting import format_score
from axpo_verifier.mathcheck import MathChecker, MathOptions

__all__ = ["EXTRACTED_MAX_CHARS", "Verifier"]

log = logging.getLogger(__name__)

EXTRACTED_MAX_CHARS = 2_000
_GRACE_S = 2.0  # on top of a started check's limit, for pebble to notice and kill
_POLL_S = 0.05


@dataclass
class _Pending:
    index: int
    item: ScoreItem
    fmt: float
    fmt_reason: str
    extraction: Extraction
    future: concurrent.futures.Future[Verdict]
    limit_s: float


def _error_reward(item: ScoreItem, exc: BaseException) -> Reward:
    name = type(exc).__name__
    message = str(exc)
    if len(message) > 200:
        message = message[:199] + "…"
    reason = f"checker error: {name}: {message}" if message else f"checker error: {name}"
    return Reward.zero(reason, checker=_kind_name(item))


def _kind_name(item: ScoreItem) -> str:
    kind = item.kind
    return kind.value if isinstance(kind, AnswerKind) else str(kind)


def _shorten(text: str | None) -> str | None:
    if text is None or len(text) <= EXTRACTED_MAX_CHARS:
        return text
    return text[: EXTRACTED_MAX_CHARS - 1] + "…"


class Verifier:
    """Scores :class:`ScoreItem` batches into :class:`Reward` lists. Thread-safe.

    Owns a :class:`MathChecker` (``settings.math_workers`` processes) unless one is passed in.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        settings: VerifierSettings | None = None,
        *,
        math_checker: MathChecker | None = None,
        queue_wait_s: float = 60.0,
    ) -> None:
        self.settings = settings if settings is not None else VerifierSettings()
        self.queue_wait_s = queue_wait_s
        self._owns_math = math_checker is None
        self._math = (
            math_checker
            if math_checker is not None
            else MathChecker(
                self.settings.math_workers,
                options=MathOptions(
                    float_rounding=self.settings.math_float_rounding,
                    numeric_precision=self.settings.math_numeric_precision,
                    set_relation=self.settings.math_set_relation,
                ),
            )
        )

    @property
    def math_checker(self) -> MathChecker:
        return self._math

    # ------------------------------------------------------------------ scoring

    def score(
        self, items: Sequence[ScoreItem], weights: RewardWeights | None = None
    ) -> list[Reward]:
        """One reward per item, in the same order (see the module docstring)."""
        w = weights if weights is not None else self.settings.reward_weights
        rewards: list[Reward | None] = [None] * len(items)
        pending: list[_Pending] = []
        for i, item in enumerate(items):
            try:
                done = self._start(i, item, w, pending)
            except Exception as exc:
                log.warning("checking item %r failed", item.item_id, exc_info=True)
                done = _error_reward(item, exc)
            rewards[i] = done
        for p in pending:
            try:
                rewards[p.index] = self._collect(p, w)
            except Exception as exc:
                log.warning("math check of item %r failed", p.item.item_id, exc_info=True)
                rewards[p.index] = _error_reward(p.item, exc)
        return [
            r if r is not None else _error_reward(items[i], RuntimeError("not scored"))
            for i, r in enumerate(rewards)
        ]

    def _start(
        self, index: int, item: ScoreItem, w: RewardWeights, pending: list[_Pending]
    ) -> Reward | None:
        """Score a non-math item now; submit a math item and return None."""
        kind = AnswerKind(item.kind)
        limit = self.settings.max_output_chars
        if len(item.output) > limit:
            return Reward.zero(
                f"output has {len(item.output)} chars, over the limit of {limit}; not read",
                checker=kind.value,
            )
        fmt, fmt_reason = format_score(item.output)
        extraction = extract_answer(item.output)
        if extraction is None:
            verdict = Verdict(False, "no answer found", None)
        elif kind is AnswerKind.MATH:
            limit_s = (
                item.time_limit_s
                if item.time_limit_s is not None
                else self.settings.default_time_limit_s
            )
            future = self._math.submit(extraction.text, item.gold, timeout_s=limit_s)
            pending.append(_Pending(index, item, fmt, fmt_reason, extraction, future, limit_s))
            return None
        elif kind is AnswerKind.CHOICE:
            verdict = check_choice(extraction.text, item.gold, item.choices)
        elif kind is AnswerKind.NUMBER:
            rel_tol = item.rel_tol if item.rel_tol is not None else self.settings.default_rel_tol
            abs_tol = item.abs_tol if item.abs_tol is not None else self.settings.default_abs_tol
            verdict = check_number(extraction.text, item.gold, rel_tol, abs_tol)
        else:
            verdict = check_text(extraction.text, item.gold)
        return self._reward(item, w, verdict, fmt, fmt_reason, extraction)

    def _collect(self, p: _Pending, w: RewardWeights) -> Reward:
        """Wait for one math check: its limit (plus grace) once started, ``queue_wait_s``
        while still queued."""
        future = p.future
        queued_until = time.monotonic() + self.queue_wait_s
        while not (future.running() or future.done()):
            if time.monotonic() >= queued_until:
                future.cancel()
                verdict = Verdict(
                    False,
                    f"math check not started within {self.queue_wait_s:g} s (workers busy)",
                    None,
                )
                return self._reward(
                    p.item, w, verdict, p.fmt, p.fmt_reason, p.extraction, timed_out=True
                )
            concurrent.futures.wait([future], timeout=_POLL_S)
        try:
            verdict = future.result(timeout=p.limit_s + _GRACE_S)
        except TimeoutError:
            future.cancel()  # kills the worker if pebble has not already
            verdict = Verdict(False, f"math check timed out after {p.limit_s:g} s", None)
            return self._reward(
                p.item, w, verdict, p.fmt, p.fmt_reason, p.extraction, timed_out=True
            )
        except concurrent.futures.CancelledError:
            verdict = Verdict(False, "math check cancelled", None)
        return self._reward(p.item, w, verdict, p.fmt, p.fmt_reason, p.extraction)

    @staticmethod
    def _reward(
        item: ScoreItem,
        w: RewardWeights,
        verdict: Verdict,
        fmt: float,
        fmt_reason: str,
        extraction: Extraction | None,
        *,
        timed_out: bool = False,
    ) -> Reward:
        accuracy = 1.0 if verdict.correct else 0.0
        tool_bonus = 1.0 if verdict.correct and item.tool_calls > 0 else 0.0
        total = accuracy * w.accuracy + fmt * w.format + tool_bonus * w.tool_bonus
        if not math.isfinite(total):
            total = 0.0
        reason = verdict.reason
        if fmt < 1.0:
            reason += f"; format {fmt:g}: {fmt_reason}"
        return Reward(
            total=total,
            correct=verdict.correct,
            accuracy=accuracy,
            format=fmt,
            tool_bonus=tool_bonus,
            extracted=_shorten(
                verdict.normalized
                if verdict.normalized is not None
                else (extraction.text if extraction is not None else None)
            ),
            checker=_kind_name(item),
            reason=reason,
            timed_out=timed_out,
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the math workers (when this verifier owns them). Idempotent."""
        if self._owns_math:
            self._math.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
