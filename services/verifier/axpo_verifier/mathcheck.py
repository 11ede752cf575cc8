"""Math answers checked by math-verify in killable worker processes.

Hostile LaTeX (``9^{9^{9^9}}``, towers of exponents, huge nested expressions) can make sympy run
for hours or eat all memory, and math-verify's own ``signal.alarm`` timeouts only work in a
process's main thread. So every check runs in a :class:`pebble.ProcessPool` worker with the
internal timeouts disabled (``parsing_timeout=None``, ``timeout_seconds=None``); pebble kills a
worker whose check runs past its time limit and starts a fresh one, and the future raises
:class:`TimeoutError`. Workers also get an address-space limit (``memory_limit_mb``, 1 GiB by
default), so a blow-up ends in ``MemoryError`` rather than in the kernel's OOM killer, and
answers or golds longer than ``max_chars`` (5,000) are refused without a worker.

Workers come from the ``forkserver`` start method (``spawn`` where there is no forkserver):
safe to use from a multi-threaded gRPC server, because the fork happens in the single-threaded
fork server, not in the server process. The fork server preloads math-verify and sympy, and each
worker's initializer runs one check, so neither the first check nor a worker restarted after a
kill pays the import cost.

Each side is parsed as ``\\boxed{<text>}`` first (so "x = 3", intervals such as ``[1, 2)``, sets
``\\{1, 2\\}`` and ``\\frac12`` are read as one expression), then as free text when that yields no
expression; prose with inline math (``The value is $\\frac34$ m``) is parsed as free text first.
Identical strings after light normalization are correct without the pool. The program's main
module must be safe to import (``if __name__ == "__main__":``), as for any spawn/forkserver pool.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import re
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pebble import ProcessPool

from axpo_verifier.checkers import Verdict

__all__ = ["MathChecker", "MathOptions", "check_math_in_process", "normalize_math"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT_MB = 1024
DEFAULT_MAX_CHARS = 5_000


@dataclass(frozen=True)
class MathOptions:
    """How math-verify compares (``VerifierSettings.math_*`` document each)."""

    float_rounding: int = 6
    numeric_precision: int = 15
    set_relation: bool = True


_FAST_DROP = re.compile(r"\\left\b|\\right\b|\\displaystyle\b|\\[,;:! ]|\$|\s")


def normalize_math(text: str) -> str:
    """Light normalization for the identical-string fast path (spacing, ``$``, ``\\left``,
    ``\\dfrac``, a trailing period)."""
    text = _FAST_DROP.sub("", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return text.rstrip(".")


# --------------------------------------------------------------------------- worker side


def _init_worker(memory_limit_mb: int | None) -> None:
    """Runs once in each worker: quiet logging, memory limit, warm math-verify."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    check_math_in_process("\\frac{1}{2}", "0.5")


def _math_verify() -> Any:
    """The math_verify module, imported on first use (workers only; the parent never needs
    sympy)."""
    import math_verify  # type: ignore[import-untyped]

    return math_verify


def _has_expression(parsed: list[Any]) -> bool:
    return any(not isinstance(p, str) for p in parsed)


def _parse(text: str) -> list[Any]:
    """Parse one side: as ``\\boxed{text}`` first, as free text (math-verify finds the LaTeX
    in it) when that yields nothing; free text first when the text is prose with ``$...$``."""
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    inner = text.strip()
    if len(inner) >= 2 and inner[0] == inner[-1] == "$":
        inner = inner.strip("$").strip()
    prose = "$" in inner or "\\(" in inner or "\\[" in inner
    candidates = [text, "\\boxed{" + inner + "}"] if prose else ["\\boxed{" + inner + "}", text]
    first: list[Any] = []
    for candidate in candidates:
        parsed: list[Any] = mv.parse(candidate, extraction_config=config, parsing_timeout=None)
        if _has_expression(parsed):
            return parsed
        first = first or parsed
    return first


def check_math_in_process(answer: str, gold: str, options: MathOptions = MathOptions()) -> Verdict:
    """Compare with math-verify in this process, without any time limit: call it only in a
    worker that can be killed."""
    gold_parsed = _parse(gold)
    if not gold_parsed:
        return Verdict(False, "gold is not parseable as math", None)
    answer_parsed = _parse(answer)
    if not answer_parsed:
        return Verdict(False, "answer is not parseable as math", None)
    # the answer as written: math-verify's own strings are rewritten ("0.5" becomes "\\frac{1}{2}")
    shown = answer.strip()
    shown = shown if len(shown) <= 200 else shown[:199] + "…"
    same = _math_verify().verify(
        gold_parsed,
        answer_parsed,
        float_rounding=options.float_rounding,
        numeric_precision=options.numeric_precision,
        allow_set_relation_comp=options.set_relation,
        timeout_seconds=None,
    )
    if same:
        return Verdict(True, "math-verify: answer equals gold", shown)
    return Verdict(False, "math-verify: answer differs from gold", shown)


def _warm() -> bool:
    return True


# --------------------------------------------------------------------------- parent side


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["math_verify", "axpo_verifier.mathcheck"])
    return ctx


def _done(verdict: Verdict) -> concurrent.futures.Future[Verdict]:
    future: concurrent.futures.Future[Verdict] = concurrent.futures.Future()
    future.set_result(verdict)
    return future


class MathChecker:
    """A pool of math-verify workers. Thread-safe; use as a context manager or call
    :meth:`close`.

    >>> with MathChecker(workers=1) as mc:                       # doctest: +SKIP
    ...     mc.submit("\\\\frac{1}{2}", "0.5", timeout_s=2).result()
    Verdict(correct=True, reason='math-verify: answer equals gold', normalized='\\\\frac{1}{2}')
    """

    def __init__(
        self,
        workers: int,
        *,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
        max_chars: int = DEFAULT_MAX_CHARS,
        options: MathOptions = MathOptions(),
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.max_chars = max_chars
        self.options = options
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ProcessPool(
            max_workers=workers,
            initializer=_init_worker,
            initargs=(memory_limit_mb,),
            context=_context(),
        )
        # start the workers now (each runs the warm-up in its initializer)
        self._warmups = [self._pool.schedule(_warm) for _ in range(workers)]

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until every worker has started and warmed up; False on timeout."""
        done, not_done = concurrent.futures.wait(self._warmups, timeout=timeout_s)
        return not not_done and all(f.exception() is None for f in done)

    def submit(
        self, answer: str, gold: str, timeout_s: float
    ) -> concurrent.futures.Future[Verdict]:
        """Schedule one check. The future resolves to a :class:`Verdict`, or raises
        :class:`TimeoutError` when the check ran past ``timeout_s`` (its worker is killed),
        or another exception when the worker died."""
        norm = normalize_math(gold)
        if norm and normalize_math(answer) == norm:
            return _done(Verdict(True, "answer identical to gold", answer.strip()))
        if len(answer) > self.max_chars:
            return _done(
                Verdict(
                    False,
                    f"answer too long for a math check ({len(answer)} chars > {self.max_chars})",
                    None,
                )
            )
        if len(gold) > self.max_chars:
            return _done(
                Verdict(False, f"gold too long for a math check ({len(gold)} chars)", None)
            )
        with self._lock:
            if self._closed:
                raise RuntimeError("MathChecker is closed")
            future: concurrent.futures.Future[Verdict] = self._pool.schedule(
                check_math_in_process, args=(answer, gold, self.options), timeout=timeout_s
            )
        return future

    def close(self) -> None:
        """Stop the workers (checks still running are abandoned). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.stop()  # type: ignore[no-untyped-call]
        try:
            self._pool.join(timeout=10)
        except (TimeoutError, RuntimeError):  # pragma: no cover - best effort
            log.warning("math worker pool did not stop within 10 s")

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
