"""``Client`` (sync) and ``AsyncClient``: the api's routes as methods, with retries, typed
errors and an SSE reader that reconnects.

Retry policy (:class:`RetryPolicy`), for every call but ``events()``:

- Retried: a connection that could not be made or broke (httpx transport errors) and the
  gateway answers 502, 503 and 504, which a restarting api or a load balancer gives.
- Not retried: any other status (4xx are the caller's to fix; 500 is a bug, retrying hides it).
- POST is retried only when the request carries an ``Idempotency-Key``: ``submit`` generates
  one unless given, so a retried submit never makes a second job; ``cancel`` is idempotent.
- Waits ``initial_backoff_s``, then multiplies by ``multiplier`` up to ``max_backoff_s``, with
  up to 50 % random jitter so clients that lost the same api do not come back in step.

``events()`` reconnects on its own terms: after any broken stream, from the last event it
received (``Last-Event-ID``), for as long as ``reconnect_timeout_s`` passes without a
successful connection; it ends after the job's final state event.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from axpo_client.errors import ApiError, error_for
from axpo_client.models import (
    Checkpoint,
    CheckpointList,
    Event,
    Job,
    JobList,
    JobState,
    MetricsPage,
)
from axpo_client.progress import Progress
from axpo_client.sse import SseParser

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried (see the module docstring)."""

    max_attempts: int = 5
    """Attempts per call, the first included."""
    initial_backoff_s: float = 0.2
    """Wait before the first retry."""
    max_backoff_s: float = 5.0
    """Longest wait between two attempts."""
    multiplier: float = 2.0
    """Factor applied to the wait after each retry."""
    reconnect_timeout_s: float = 60.0
    """``events()``: give up after this long without a successful connection."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based), jittered."""
        base = min(self.initial_backoff_s * self.multiplier ** (attempt - 1), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)


def load_spec(spec: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A job spec as a dict: a mapping as is, or a YAML file read (needs pyyaml)."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    try:
        import yaml
    except ImportError as exc:
        raise RuntimeError(
            f"reading {path} needs pyyaml (pip install pyyaml), or pass the spec as a dict"
        ) from exc
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _frame(records: builtins.list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise RuntimeError("metrics(as_frame=True) needs pandas (pip install pandas)") from exc
    return pd.DataFrame.from_records(records)


def _event(raw_id: str, kind: str, data: str) -> Event:
    return Event.model_validate({"id": raw_id, "type": kind, "data": json.loads(data)})


class _Base:
    def __init__(
        self,
        url: str | None,
        token: str | None,
        timeout_s: float,
        retry: RetryPolicy | None,
    ) -> None:
        self.url = (url or os.environ.get("AXPO_API_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("AXPO_API_TOKEN")
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @staticmethod
    def _check(resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            raise error_for(resp.status_code, resp.content, resp.headers.get("content-type", ""))
        return resp

    def _events_timeout(self) -> httpx.Timeout:
        # The api sends a comment at least every sse_ping_s (15 s by default): a read that
        # waits 4x that long is a dead connection.
        return httpx.Timeout(self.timeout_s, read=max(self.timeout_s, 60.0))

    @staticmethod
    def _can_retry(method: str, headers: Mapping[str, str] | None, path: str) -> bool:
        if method == "GET":
            return True
        return bool(headers and "Idempotency-Key" in headers) or path.endswith("/cancel")

    def _unreachable(self, exc: Exception) -> ApiError:
        return ApiError(0, f"api at {self.url} unreachable: {type(exc).__name__}: {exc}")


class Client(_Base):
    """The api, synchronously.

    >>> with Client("http://127.0.0.1:8000", token="...") as c:  # doctest: +SKIP
    ...     job = c.submit("configs/tiny-cpu-axpo.yaml")
    ...     job = c.wait(job.id)

    ``url`` and ``token`` default to ``AXPO_API_URL`` and ``AXPO_API_TOKEN``.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout_s, retry)
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        retry = self._can_retry(method, headers, path)
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._http.request(
                    method,
                    path,
                    json=json_body,
                    params=params,
                    headers={**self._headers(), **(headers or {})},
                )
            except httpx.TransportError as exc:
                if not retry or attempt >= self.retry.max_attempts:
                    raise self._unreachable(exc) from exc
            else:
                if resp.status_code not in RETRY_STATUSES or not retry:
                    return self._check(resp)
                if attempt >= self.retry.max_attempts:
                    return self._check(resp)
            time.sleep(self.retry.delay(attempt))

    def submit(
        self,
        spec: Mapping[str, Any] | str | os.PathLike[str],
        *,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a job: a spec mapping, or the path of a YAML spec. A retry (or a second call
        with the same ``idempotency_key``) returns the same job."""
        key = idempotency_key or uuid.uuid4().hex
        resp = self._request(
            "POST", "/v1/jobs", json_body=load_spec(spec), headers={"Idempotency-Key": key}
        )
        return Job.model_validate_json(resp.content)

    def get(self, job_id: str) -> Job:
        return Job.model_validate_json(self._request("GET", f"/v1/jobs/{job_id}").content)

    def list(
        self, state: JobState | str | None = None, *, limit: int = 50, cursor: int | None = None
    ) -> JobList:
        """One page of jobs, newest first; ``next_cursor`` fetches the next."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = str(JobState(state))
        if cursor is not None:
            params["cursor"] = cursor
        return JobList.model_validate_json(self._request("GET", "/v1/jobs", params=params).content)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job (a running one stops after its learner checkpoints: see ``wait``).
        Raises Conflict for a finished job."""
        return Job.model_validate_json(self._request("POST", f"/v1/jobs/{job_id}/cancel").content)

    def metrics(self, job_id: str, *, after_step: int = -1, as_frame: bool = False) -> Any:
        """Every step record after ``after_step`` (a list of dicts, or a pandas DataFrame with
        ``as_frame``)."""
        records: builtins.list[dict[str, Any]] = []
        while True:
            page = MetricsPage.model_validate_json(
                self._request(
                    "GET", f"/v1/jobs/{job_id}/metrics", params={"after_step": after_step}
                ).content
            )
            records.extend(page.records)
            if page.next_after_step is None:
                break
            after_step = page.next_after_step
        return _frame(records) if as_frame else records

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        resp = self._request("GET", f"/v1/jobs/{job_id}/checkpoints")
        return CheckpointList.model_validate_json(resp.content).items

    def events(self, job_id: str, *, after: str | None = None) -> Iterator[Event]:
        """The job's events from the first (or after the event id ``after``), live, until its
        final state; reconnects from the last event received when the stream breaks."""
        last = after
        failures = 0
        failing_since: float | None = None
        while True:
            headers = {**self._headers(), "Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = last
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=self._events_timeout(),
                ) as resp:
                    if resp.status_code == 204:  # SSE: nothing more will come, do not reconnect
                        return
                    if resp.status_code not in RETRY_STATUSES:
                        if resp.status_code >= 400:
                            resp.read()
                            self._check(resp)
                        failures, failing_since = 0, None
                        parser = SseParser()
                        for line in resp.iter_lines():
                            raw = parser.feed(line)
                            if raw is None or raw.id is None:
                                continue
                            event = _event(raw.id, raw.event, raw.data)
                            last = event.id
                            yield event
                            if event.final:
                                return
            except httpx.TransportError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                elif time.monotonic() - failing_since > self.retry.reconnect_timeout_s:
                    raise self._unreachable(exc) from exc
            failures += 1
            time.sleep(min(self.retry.delay(failures), 2.0))

    def wait(self, job_id: str, *, progress: bool = True, timeout_s: float | None = None) -> Job:
        """Follow the job until it finishes and return it; with ``progress``, show step,
        reward, tool-call rate, all-wrong rate and ETA. Raises TimeoutError after ``timeout_s``
        (checked at each event; the api sends one at least every ``sse_ping_s``)."""
        job = self.get(job_id)
        if job.state.finished:
            return job
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = Progress(job) if progress else None
        try:
            for event in self.events(job_id):
                if bar is not None and event.type == "step":
                    bar.step(event.data)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s} s")
            job = self.get(job_id)
        finally:
            if bar is not None:
                bar.close(job)
        return job


class AsyncClient(_Base):
    """The api for asyncio code; the same methods as :class:`Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout_s, retry)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        retry = self._can_retry(method, headers, path)
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self._http.request(
                    method,
                    path,
                    json=json_body,
                    params=params,
                    headers={**self._headers(), **(headers or {})},
                )
            except httpx.TransportError as exc:
                if not retry or attempt >= self.retry.max_attempts:
                    raise self._unreachable(exc) from exc
            else:
                if resp.status_code not in RETRY_STATUSES or not retry:
                    return self._check(resp)
                if attempt >= self.retry.max_attempts:
                    return self._check(resp)
            await asyncio.sleep(self.retry.delay(attempt))

    async def submit(
        self,
        spec: Mapping[str, Any] | str | os.PathLike[str],
        *,
        idempotency_key: str | None = None,
    ) -> Job:
        key = idempotency_key or uuid.uuid4().hex
        resp = await self._request(
            "POST", "/v1/jobs", json_body=load_spec(spec), headers={"Idempotency-Key": key}
        )
        return Job.model_validate_json(resp.content)

    async def get(self, job_id: str) -> Job:
        return Job.model_validate_json((await self._request("GET", f"/v1/jobs/{job_id}")).content)

    async def list(
        self, state: JobState | str | None = None, *, limit: int = 50, cursor: int | None = None
    ) -> JobList:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = str(JobState(state))
        if cursor is not None:
            params["cursor"] = cursor
        resp = await self._request("GET", "/v1/jobs", params=params)
        return JobList.model_validate_json(resp.content)

    async def cancel(self, job_id: str) -> Job:
        resp = await self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return Job.model_validate_json(resp.content)

    async def metrics(self, job_id: str, *, after_step: int = -1, as_frame: bool = False) -> Any:
        records: builtins.list[dict[str, Any]] = []
        while True:
            resp = await self._request(
                "GET", f"/v1/jobs/{job_id}/metrics", params={"after_step": after_step}
            )
            page = MetricsPage.model_validate_json(resp.content)
            records.extend(page.records)
            if page.next_after_step is None:
                break
            after_step = page.next_after_step
        return _frame(records) if as_frame else records

    async def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        resp = await self._request("GET", f"/v1/jobs/{job_id}/checkpoints")
        return CheckpointList.model_validate_json(resp.content).items

    async def events(self, job_id: str, *, after: str | None = None) -> AsyncIterator[Event]:
        last = after
        failures = 0
        failing_since: float | None = None
        while True:
            headers = {**self._headers(), "Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = last
            try:
                async with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=self._events_timeout(),
                ) as resp:
                    if resp.status_code == 204:
                        return
                    if resp.status_code not in RETRY_STATUSES:
                        if resp.status_code >= 400:
                            await resp.aread()
                            self._check(resp)
                        failures, failing_since = 0, None
                        parser = SseParser()
                        async for line in resp.aiter_lines():
                            raw = parser.feed(line)
                            if raw is None or raw.id is None:
                                continue
                            event = _event(raw.id, raw.event, raw.data)
                            last = event.id
                            yield event
                            if event.final:
                                return
            except httpx.TransportError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                elif time.monotonic() - failing_since > self.retry.reconnect_timeout_s:
                    raise self._unreachable(exc) from exc
            failures += 1
            await asyncio.sleep(min(self.retry.delay(failures), 2.0))

    async def wait(
        self, job_id: str, *, progress: bool = True, timeout_s: float | None = None
    ) -> Job:
        job = await self.get(job_id)
        if job.state.finished:
            return job
        bar = Progress(job) if progress else None

        async def follow() -> None:
            async for event in self.events(job_id):
                if bar is not None and event.type == "step":
                    bar.step(event.data)

        try:
            await asyncio.wait_for(follow(), timeout_s)
            job = await self.get(job_id)
        finally:
            if bar is not None:
                bar.close(job)
        return job
