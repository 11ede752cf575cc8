"""The api's request and response models, defined once here: the api service
(``axpo_api``) imports them for its routes and its OpenAPI schema, so server and client cannot
drift apart and no generated code has to be kept in step.

The request body of ``POST /v1/jobs`` is a job spec (``axpo.settings.job.JobSpec`` on the
server); the client sends it as a plain mapping so it needs no axpo core.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobState(StrEnum):
    """``queued -> running -> succeeded | failed | cancelled``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


EventType = Literal["state", "step", "checkpoint", "publish", "restart", "cancel_requested"]

_CONFIG = ConfigDict(extra="ignore", frozen=True)


class Job(BaseModel):
    """A training job as the api reports it."""

    model_config = _CONFIG

    id: str = Field(description="Job id: the spec's name and 10 hex digits.")
    name: str = Field(description="The spec's name.")
    state: JobState = Field(description="Where the job is in its life.")
    spec: dict[str, Any] = Field(description="The job spec as submitted, defaults filled in.")
    steps: int = Field(description="Optimizer steps the job runs (the spec's `steps`).")
    step: int = Field(description="Last optimizer step recorded (0 before the first).")
    policy_version: int = Field(description="Policy version after the last recorded step.")
    last_step: dict[str, Any] | None = Field(
        description="The last step record (as in metrics.jsonl), null before the first step."
    )
    error: str | None = Field(description="Why the job failed; null unless failed.")
    cancel_requested: bool = Field(description="A cancel was requested while it ran.")
    created_at: datetime = Field(description="When it was submitted (UTC).")
    started_at: datetime | None = Field(description="When it started running.")
    ended_at: datetime | None = Field(description="When it finished.")


class JobList(BaseModel):
    """One page of jobs, newest first."""

    model_config = _CONFIG

    items: list[Job]
    next_cursor: int | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class MetricsPage(BaseModel):
    """Step records of a job in step order."""

    model_config = _CONFIG

    job_id: str
    records: list[dict[str, Any]] = Field(description="Step records as in metrics.jsonl.")
    next_after_step: int | None = Field(
        description="Pass as `after_step` for the next page; null when this page is the last "
        "for now."
    )


class Checkpoint(BaseModel):
    """A checkpoint the learner wrote."""

    model_config = _CONFIG

    step: int
    path: str
    time: datetime


class CheckpointList(BaseModel):
    model_config = _CONFIG

    items: list[Checkpoint]


class Event(BaseModel):
    """One server-sent event of a job: ``id`` is the value to resume after (`Last-Event-ID`)."""

    model_config = _CONFIG

    id: str
    type: EventType
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        """A state event that ends the job (nothing follows it)."""
        return self.type == "state" and JobState(self.data.get("state", "")).finished


class FieldError(BaseModel):
    """One invalid field of a request."""

    model_config = _CONFIG

    loc: str = Field(description="Dotted path of the field, e.g. `algorithm.rho`.")
    msg: str
    type: str


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    model_config = _CONFIG

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = Field(
        default=None, description="Every invalid field (422 only)."
    )


class Health(BaseModel):
    model_config = _CONFIG

    status: Literal["ok", "unavailable"]
    redis: bool | None = Field(default=None, description="Redis answered a ping (readyz only).")
