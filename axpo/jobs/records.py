"""What the job store holds: :class:`JobState` and its allowed transitions, :class:`JobRecord`,
:class:`JobEvent`, and the store's errors."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """``queued -> running -> succeeded | failed | cancelled`` (a queued job may also be
    cancelled, or fail before it runs)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# New state -> the states it may be entered from.
ALLOWED_FROM: dict[JobState, tuple[JobState, ...]] = {
    JobState.RUNNING: (JobState.QUEUED,),
    JobState.SUCCEEDED: (JobState.RUNNING,),
    JobState.FAILED: (JobState.QUEUED, JobState.RUNNING),
    JobState.CANCELLED: (JobState.QUEUED, JobState.RUNNING),
}

EVENT_TYPES = ("state", "step", "checkpoint", "publish", "restart", "cancel_requested")
"""Event types on a job's stream: ``state`` (data: ``state``, ``error``, ``time``),
``step`` (the step record), ``checkpoint`` (``step``, ``path``), ``publish`` (``version``,
``step``), ``restart`` (``process``, ``reason``, ``restarts``), ``cancel_requested``."""


class JobNotFoundError(LookupError):
    """No job with this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class JobStateError(RuntimeError):
    """A change the job's current state does not allow (cancelling a finished job,
    recording a step of a job that is not running, ...)."""

    def __init__(self, job_id: str, state: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class IdempotencyConflictError(RuntimeError):
    """An idempotency key reused with a different job spec."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was used for job {job_id} with a different spec; "
            "use a new key for a new job"
        )
        self.job_id = job_id


@dataclass(frozen=True)
class JobRecord:
    """One job as stored (times are Unix seconds; ``last_step`` is the last step record)."""

    id: str
    name: str
    state: JobState
    spec: dict[str, Any]
    steps: int
    step: int
    policy_version: int
    last_step: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    ended_at: float | None

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> JobRecord:
        h = {k.decode(): v.decode() for k, v in raw.items()}

        def opt_float(key: str) -> float | None:
            return float(h[key]) if h.get(key) else None

        return cls(
            id=h["id"],
            name=h["name"],
            state=JobState(h["state"]),
            spec=json.loads(h["spec"]),
            steps=int(h["steps"]),
            step=int(h["step"]),
            policy_version=int(h["policy_version"]),
            last_step=json.loads(h["last_step"]) if h.get("last_step") else None,
            error=h.get("error") or None,
            cancel_requested=h.get("cancel_requested") == "1",
            created_at=float(h["created_at"]),
            started_at=opt_float("started_at"),
            ended_at=opt_float("ended_at"),
        )


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream; ``id`` is the Redis stream id (``ms-seq``), so
    reading after an id resumes without gaps."""

    id: str
    type: str
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> JobEvent:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return cls(id=eid, type=fields[b"type"].decode(), data=json.loads(fields[b"data"]))


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN/Infinity),
    as ``metrics.jsonl`` writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, separators=(",", ":"))
