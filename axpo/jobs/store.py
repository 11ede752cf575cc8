"""The job store's client, :class:`JobStore` (keys and contract: :mod:`axpo.jobs`)."""

from __future__ import annotations

import builtins
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis

from axpo.jobs.records import (
    ALLOWED_FROM,
    IdempotencyConflictError,
    JobEvent,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStateError,
    dumps,
)
from axpo.jobs.scripts import (
    CLAIM_NEXT,
    RECORD_EVENT,
    RECORD_STEP,
    REQUEST_CANCEL,
    SUBMIT,
    TRANSITION,
)
from axpo.settings.job import JobSpec

MAX_PAGE = 500


def _any(value: object) -> Any:
    """redis-py annotates replies as ``Awaitable | Any``; this client is synchronous."""
    return value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def new_job_id(name: str) -> str:
    """A readable, unique id: the job's name and 10 random hex digits (``tiny-3f9a1c2b7d``).
    Valid as a queue job id (no ``:`` or spaces: the name's pattern allows neither)."""
    return f"{name[:48]}-{uuid.uuid4().hex[:10]}"


def spec_digest(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class JobStore:
    """Jobs of one deployment in Redis. Thread-safe as redis-py's client is (each call is one
    command or one script).

    ``client`` must return bytes (``decode_responses=False``, redis-py's default).
    """

    def __init__(
        self, client: redis.Redis, key_prefix: str = "axpo", idempotency_ttl_s: int = 86_400
    ) -> None:
        if not key_prefix or any(c.isspace() for c in key_prefix):
            raise ValueError(f"key prefix {key_prefix!r}: must be non-empty without spaces")
        if idempotency_ttl_s < 1:
            raise ValueError(f"idempotency_ttl_s {idempotency_ttl_s}: must be >= 1")
        self.client = client
        self.prefix = f"{key_prefix}:jobs"
        self.idempotency_ttl_s = idempotency_ttl_s
        self._submit = client.register_script(SUBMIT)
        self._transition = client.register_script(TRANSITION)
        self._claim = client.register_script(CLAIM_NEXT)
        self._record_step = client.register_script(RECORD_STEP)
        self._record_event = client.register_script(RECORD_EVENT)
        self._request_cancel = client.register_script(REQUEST_CANCEL)

    # ----------------------------------------------------------------------- keys

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def metrics_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:metrics"

    def checkpoints_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:checkpoints"

    @property
    def _all_key(self) -> str:
        return f"{self.prefix}:all"

    @property
    def _state_prefix(self) -> str:
        return f"{self.prefix}:state:"

    @property
    def _queue_key(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def _running_key(self) -> str:
        return f"{self.prefix}:running"

    # ----------------------------------------------------------------------- submit, read

    def submit(
        self, spec: JobSpec, *, idempotency_key: str | None = None, scope: str = ""
    ) -> tuple[JobRecord, bool]:
        """Queue a job; returns ``(job, created)``.

        With ``idempotency_key`` (scoped by ``scope``, e.g. the caller's token), a retry
        within ``idempotency_ttl_s`` returns the job the first call created (``created``
        False); the key reused with another spec raises IdempotencyConflictError.
        """
        spec_json = spec.model_dump(mode="json")
        job_id = new_job_id(spec.name)
        idem = ""
        if idempotency_key is not None:
            digest = hashlib.sha256(f"{scope}\0{idempotency_key}".encode()).hexdigest()
            idem = f"{self.prefix}:idempotency:{digest}"
        now = time.time()
        event = dumps({"state": JobState.QUEUED, "error": None, "time": now})
        code, found = _any(
            self._submit(
                keys=[
                    self.job_key(job_id),
                    self._all_key,
                    self._state_prefix,
                    self._queue_key,
                    self.events_key(job_id),
                    idem,
                    f"{self.prefix}:seq",
                ],
                args=[
                    job_id,
                    dumps(spec_json),
                    spec.name,
                    spec.steps,
                    repr(now),
                    self.idempotency_ttl_s,
                    spec_digest(spec_json),
                    event,
                    f"{self.prefix}:job:",
                ],
            )
        )
        found_id = _text(found)
        if code == -1:
            raise IdempotencyConflictError(idempotency_key or "", found_id)
        return self.get(found_id), code == 1

    def find(self, job_id: str) -> JobRecord | None:
        raw = _any(self.client.hgetall(self.job_key(job_id)))
        return JobRecord.from_hash(raw) if raw else None

    def get(self, job_id: str) -> JobRecord:
        """The job; raises JobNotFoundError."""
        job = self.find(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    def list(
        self, state: JobState | None = None, limit: int = 50, cursor: int | None = None
    ) -> tuple[builtins.list[JobRecord], int | None]:
        """Jobs newest first, ``limit`` at a time; returns ``(jobs, next_cursor)``. Pass
        ``next_cursor`` back to get the next page (None: this was the last)."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit {limit}: must be within 1..{MAX_PAGE}")
        key = self._all_key if state is None else self._state_prefix + JobState(state)
        top: str | int = "+inf" if cursor is None else f"({cursor}"
        rows = _any(
            self.client.zrevrangebyscore(key, top, "-inf", start=0, num=limit + 1, withscores=True)
        )
        pipe = self.client.pipeline(transaction=False)
        for member, _ in rows[:limit]:
            pipe.hgetall(self.job_key(_text(member)))
        jobs = [JobRecord.from_hash(raw) for raw in pipe.execute() if raw]
        next_cursor = int(rows[limit - 1][1]) if len(rows) > limit else None
        return jobs, next_cursor

    # ----------------------------------------------------------------------- lifecycle

    def claim_next(self) -> JobRecord | None:
        """The job this deployment should run: the one already claimed and not finished (a
        restarted learner resumes it), else the oldest queued job, now claimed (still
        ``queued`` until :meth:`mark_running`). None when no job waits. One job at a time."""
        found = _any(
            self._claim(keys=[self._running_key, self._queue_key], args=[f"{self.prefix}:job:"])
        )
        return None if found is None else self.get(_text(found))

    def mark_running(self, job_id: str) -> JobRecord:
        """``queued -> running`` (sets ``started_at``). Running already is fine (a restarted
        learner calls it again); raises JobStateError for a finished job."""
        job = self.get(job_id)
        if job.state == JobState.RUNNING:
            return job
        return self._change(job_id, JobState.RUNNING, "started_at")

    def finish(self, job_id: str, state: JobState | str, error: str | None = None) -> JobRecord:
        """End the job as ``succeeded``, ``failed`` (with ``error``) or ``cancelled``; frees
        the deployment for the next job. Raises JobStateError for a job already finished."""
        state = JobState(state)
        if not state.finished:
            raise ValueError(f"finish: {state} is not a final state (succeeded, failed, cancelled)")
        if state == JobState.FAILED and not error:
            raise ValueError("finish: a failed job needs an error message")
        return self._change(job_id, state, "ended_at", error)

    def cancel(self, job_id: str) -> JobRecord:
        """A queued job is cancelled at once; a running one gets its cancel flag (its workers
        stop and the learner checkpoints, then call ``finish(cancelled)``). Cancelling twice is
        harmless; a finished job raises JobStateError."""
        job = self.get(job_id)
        if job.state == JobState.QUEUED:
            try:
                return self._change(job_id, JobState.CANCELLED, "ended_at")
            except JobStateError:
                pass  # claimed and started meanwhile: request it as for a running job
        code, state = _any(
            self._request_cancel(
                keys=[self.job_key(job_id), self.events_key(job_id)],
                args=[dumps({"time": time.time()})],
            )
        )
        state = _text(state)
        if code == -1:
            raise JobNotFoundError(job_id)
        if state != JobState.RUNNING:
            raise JobStateError(
                job_id,
                state,
                f"job {job_id} is already {state}: a finished job cannot be cancelled",
            )
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether the job should stop (its cancel flag; workers poll this)."""
        flag: bytes | None = _any(self.client.hget(self.job_key(job_id), "cancel_requested"))
        return flag == b"1"

    def _change(
        self, job_id: str, new: JobState, time_field: str, error: str | None = None
    ) -> JobRecord:
        now = time.time()
        allowed = ALLOWED_FROM[new]
        code, old = _any(
            self._transition(
                keys=[
                    self.job_key(job_id),
                    self._state_prefix,
                    self.events_key(job_id),
                    self._running_key,
                    self._queue_key,
                ],
                args=[
                    new,
                    time_field,
                    repr(now),
                    error or "",
                    dumps({"state": new, "error": error, "time": now}),
                    *allowed,
                ],
            )
        )
        old = _text(old)
        if code == -1:
            raise JobNotFoundError(job_id)
        if code == 0:
            raise JobStateError(
                job_id,
                old,
                f"job {job_id} is {old}: it cannot become {new} (only from {' or '.join(allowed)})",
            )
        return self.get(job_id)

    # ----------------------------------------------------------------------- runtime

    def start_runtime(self, job_id: str, runtime: Mapping[str, Any]) -> dict[str, Any]:
        """Store what the job's runner decided when it first started the job (``runtime``,
        JSON: a deployment's learner stores the job's first weight version and queue
        backlog, which its rollout workers follow) unless an earlier start stored it already
        (a restarted learner keeps the first decision); returns the stored runtime. Raises
        JobNotFoundError for an unknown job."""
        key = self.job_key(job_id)
        if not _any(self.client.exists(key)):
            raise JobNotFoundError(job_id)
        self.client.hsetnx(key, "runtime", dumps(runtime))
        stored = self.runtime(job_id)
        assert stored is not None
        return stored

    def runtime(self, job_id: str) -> dict[str, Any] | None:
        """The job's runtime (:meth:`start_runtime`); None before its runner started it."""
        raw: bytes | None = _any(self.client.hget(self.job_key(job_id), "runtime"))
        return None if raw is None else dict(json.loads(raw))

    def running_job(self) -> JobRecord | None:
        """The job this deployment runs now: the claimed job when it is ``running`` (not
        merely claimed, nor finished); None otherwise. What rollout workers follow."""
        found: bytes | None = _any(self.client.get(self._running_key))
        if found is None:
            return None
        job = self.find(_text(found))
        return job if job is not None and job.state == JobState.RUNNING else None

    # ----------------------------------------------------------------------- progress

    def record_step(self, job_id: str, record: Mapping[str, Any]) -> str:
        """Store one step record (as written to ``metrics.jsonl``: ``step`` and
        ``policy_version`` keys, floats) and emit a ``step`` event; returns the event id.
        Raises JobStateError unless the job is running."""
        if "step" not in record:
            raise ValueError(f"job {job_id}: a step record needs a 'step' key")
        step = int(record["step"])
        version = int(record.get("policy_version", 0) or 0)
        data = dumps(record)
        try:
            return _text(
                _any(
                    self._record_step(
                        keys=[
                            self.job_key(job_id),
                            self.metrics_key(job_id),
                            self.events_key(job_id),
                        ],
                        args=[step, version, data, data],
                    )
                )
            )
        except redis.ResponseError as exc:
            if "NOTRUNNING" not in str(exc):
                raise
            state = str(exc).split()[-1]
            if state in ("nil", "false"):
                raise JobNotFoundError(job_id) from exc
            raise JobStateError(
                job_id, state, f"job {job_id} is {state}: steps are recorded only while running"
            ) from exc

    def record_checkpoint(self, job_id: str, step: int, path: str) -> str:
        """A checkpoint written at ``step`` (listed by :meth:`checkpoints`)."""
        entry = {"step": step, "path": path, "time": time.time()}
        return self._event(job_id, "checkpoint", entry, self.checkpoints_key(job_id))

    def record_publish(self, job_id: str, version: int, step: int) -> str:
        """Weights of ``version`` published to the inference replicas."""
        return self._event(job_id, "publish", {"version": version, "step": step})

    def record_restart(self, job_id: str, process: str, reason: str, restarts: int) -> str:
        """A supervised process restarted (``restarts``: its count so far)."""
        data = {"process": process, "reason": reason, "restarts": restarts}
        return self._event(job_id, "restart", data)

    def _event(self, job_id: str, kind: str, data: Mapping[str, Any], list_key: str = "") -> str:
        payload = dumps({**data, "time": data.get("time", time.time())})
        try:
            return _text(
                _any(
                    self._record_event(
                        keys=[self.job_key(job_id), self.events_key(job_id), list_key],
                        args=[kind, payload, payload, "", ""],
                    )
                )
            )
        except redis.ResponseError as exc:
            if "NOJOB" in str(exc):
                raise JobNotFoundError(job_id) from exc
            raise

    # ----------------------------------------------------------------------- reading

    def metrics(
        self, job_id: str, after_step: int = -1, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        """Step records with ``step > after_step``, in step order, at most ``limit``."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit {limit}: must be within 1..{MAX_PAGE}")
        rows = _any(
            self.client.zrangebyscore(
                self.metrics_key(job_id), f"({after_step}", "+inf", start=0, num=limit
            )
        )
        return [json.loads(r) for r in rows]

    def checkpoints(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """Checkpoints in the order they were written: ``step``, ``path``, ``time``."""
        return [
            json.loads(r) for r in _any(self.client.lrange(self.checkpoints_key(job_id), 0, -1))
        ]

    def events(
        self, job_id: str, after: str = "0", count: int = 100, block_ms: int | None = None
    ) -> builtins.list[JobEvent]:
        """Events after the stream id ``after`` (exclusive; ``"0"``: from the first), waiting
        up to ``block_ms`` for one when there are none (None: do not wait)."""
        reply = _any(
            self.client.xread({self.events_key(job_id): after}, count=count, block=block_ms)
        )
        if not reply:
            return []
        return [JobEvent.from_entry(eid, fields) for eid, fields in reply[0][1]]
