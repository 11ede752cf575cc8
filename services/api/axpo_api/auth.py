"""Bearer-token auth and the per-token rate limit.

Tokens are compared with ``hmac.compare_digest`` against every configured token (no early
exit), so the time taken says nothing about how close a guess was. A token is never logged:
logs and rate-limit buckets use its fingerprint (the first 12 hex digits of its sha256).

The rate limit is a token bucket per token held in this process: with N api replicas a token
may make N times ``rate_limit_per_s``. Good enough to stop a runaway script; a shared limit
would need a Redis round trip per request.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Sequence

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from axpo_api.problems import ApiProblem

bearer = HTTPBearer(auto_error=False, description="A token from AXPO_API_TOKENS.")


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenBuckets:
    """``rate`` requests per second sustained, ``burst`` at once, per key."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def take(self, key: str) -> float:
        """Take one token for ``key``; returns 0 when allowed, else seconds until allowed."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class Auth:
    """The dependency every route but health uses: 401 without a bearer token, 403 with one
    not configured, 429 past the rate limit. Returns the token's fingerprint."""

    def __init__(self, tokens: Sequence[str], buckets: TokenBuckets) -> None:
        if not tokens:
            raise ValueError("no api token configured")
        self._tokens = [t.encode() for t in tokens]
        self.buckets = buckets

    def check(self, token: str) -> bool:
        given = token.encode()
        ok = False
        for known in self._tokens:
            ok |= hmac.compare_digest(given, known)
        return ok

    def __call__(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> str:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiProblem(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self.check(credentials.credentials):
            raise ApiProblem(403, "the bearer token is not accepted by this api")
        key = fingerprint(credentials.credentials)
        request.state.token = key
        wait = self.buckets.take(key)
        if wait > 0:
            raise ApiProblem(
                429,
                f"rate limit of {self.buckets.rate:g} requests/s (burst {self.buckets.burst}) "
                f"exceeded for this token; retry in {wait:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return key
