"""What the loop reports: :class:`LoopStatus` (``LearnerService.Status``) and the counters it is
built from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from axpo.queue import QueueCounters


@dataclass(frozen=True)
class LoopStatus:
    """A consistent snapshot of the loop for ``LearnerService.Status``."""

    job_id: str
    step: int
    """Optimizer steps completed (counted across restarts: restored from the checkpoint)."""
    policy_version: int
    """Version of the trainer's current weights."""
    published_version: int
    """Latest version confirmed by every replica (the restored version after a restart, the
    trainer's version when there is no publisher)."""
    groups_trained: int
    """Groups trained by this process (its checkpoints may not cover the last ones yet)."""
    partial_steps: int
    """Steps trained on fewer than ``questions_per_step`` groups (``step_timeout_s``)."""
    groups_dead_lettered: int
    """Groups this process dead-lettered because the trainer could not batch them (also in
    ``queue.dead_lettered``, which counts every consumer's dead letters)."""
    publish_failures: int
    last_metrics: dict[str, float]
    queue_lag: int
    """Groups not yet acknowledged (queued plus held by the learner); last known value."""
    queue: QueueCounters
    """The job's queue counters (kept in Redis); last known values."""
    running: bool
    error: str
    """Why the loop ended with an error; empty otherwise."""


@dataclass
class LoopState:
    """The loop's mutable counters, guarded by the loop's lock."""

    groups_trained: int = 0
    partial_steps: int = 0
    groups_dead_lettered: int = 0
    publish_failures: int = 0
    published_version: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    queue_lag: int = 0
    queue: QueueCounters = field(default_factory=QueueCounters)
    running: bool = False
    error: str = ""


def describe(status: LoopStatus) -> dict[str, Any]:
    """The status as plain JSON-able values (logs, the CLI)."""
    return asdict(status)
