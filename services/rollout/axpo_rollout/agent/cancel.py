"""Cancelling a speculative branch: :class:`CancelToken`, and :class:`Cancelled`, raised by a
Backend or the loop when a generation the loop no longer needs was cancelled."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Cancelled(Exception):
    """A generation the loop no longer needs was cancelled (raised by a Backend or the loop)."""


class CancelToken:
    """Cancels a speculative branch once: :meth:`cancel` runs every registered callback (a
    Backend registers the cancellation of its in-flight call); a callback registered after
    the fact runs at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def on_cancel(self, fn: Callable[[], object]) -> None:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(fn)
                return
        fn()

    def check(self) -> None:
        if self._cancelled:
            raise Cancelled("speculative resample cancelled: a tool-using rollout is correct")
