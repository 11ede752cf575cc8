"""Queue calls that survive a Redis outage: repeated with backoff for up to ``redis_retry_s``
(the client reconnects; Lua scripts are reloaded), then the error is raised."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which a Redis call is worth repeating (BusyLoadingError, raised while Redis
# replays its AOF, is a ConnectionError).
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


class Stopped(Exception):
    """A stop was requested while waiting on Redis."""


class RedisRetry:
    """Calls a queue operation, repeating it while Redis does not answer."""

    def __init__(self, retry_s: float, stop: threading.Event) -> None:
        self.retry_s = retry_s
        self._stop = stop

    def __call__(self, call: Callable[[], T], *, wait: bool = False) -> T:
        """``call()``, repeated while Redis does not answer, for up to ``retry_s``.
        Unless ``wait``, a stop request ends the waiting with :class:`Stopped`."""
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return call()
            except TRANSIENT as exc:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_s
                    log.warning("redis unavailable, retrying for %gs: %s", self.retry_s, exc)
                if now >= deadline:
                    raise
                if not wait and self._stop.is_set():
                    raise Stopped from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
