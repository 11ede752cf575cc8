"""What the queue stores and hands out: stream field names, prompt tasks, deliveries,
counters, and the error a producer gets when the learner falls behind."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from axpo.contracts import domain as d

# Field names of stream entries (bytes, as redis-py returns them).
F_GROUP = b"group"
F_IMAGES = b"images"
F_VERSION = b"version"
F_TASK = b"task"


class QueueFullError(TimeoutError):
    """A producer waited longer than ``backpressure_timeout_s`` for the learner to catch up."""


@dataclass(frozen=True)
class PromptTask:
    """One work item for a rollout worker (stored as JSON, see the module docstring)."""

    task_id: str
    question_id: str
    policy_version: int = 0
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "task_id": self.task_id,
                "question_id": self.question_id,
                "policy_version": self.policy_version,
                "data": dict(self.data),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PromptTask:
        """Raises ValueError naming what is wrong."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"prompt task is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ValueError("prompt task is not a JSON object")
        task_id, question_id = obj.get("task_id"), obj.get("question_id")
        version, data = obj.get("policy_version", 0), obj.get("data", {})
        if not isinstance(task_id, str) or not isinstance(question_id, str):
            raise ValueError("prompt task needs string task_id and question_id")
        if not isinstance(version, int) or not isinstance(data, dict):
            raise ValueError("prompt task: policy_version must be an int and data an object")
        return cls(task_id, question_id, version, data)


@dataclass(frozen=True)
class Delivery:
    """A group taken from the queue, images re-attached. Acknowledge ``entry_id`` once the
    effect of training on it is durable."""

    entry_id: str
    group: d.Group


@dataclass(frozen=True)
class PromptDelivery:
    entry_id: str
    task: PromptTask


@dataclass(frozen=True)
class QueueCounters:
    """Totals of a job's queue, kept in Redis (they survive restarts of every process)."""

    produced: int = 0
    """Groups added."""
    consumed: int = 0
    """Groups acknowledged by the learner (trained and checkpointed)."""
    dropped_stale: int = 0
    """Groups dropped for exceeding ``max_policy_lag``."""
    dead_lettered: int = 0
    """Groups moved to the dead-letter stream."""
    reclaimed: int = 0
    """Group deliveries taken over from idle consumers."""
    prompts_produced: int = 0
    """Prompt tasks added."""
    prompts_done: int = 0
    """Prompt tasks acknowledged."""
    prompts_dead_lettered: int = 0
    """Prompt tasks moved to the dead-letter stream."""
