"""What a job's runner records in the job store after each step (:class:`JobProgress`): the
step record, the checkpoints that appeared and the weight version now served. Used by
``axpo run``'s launcher and by a deployment's learner."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axpo.jobs.store import JobStore


@dataclass
class JobProgress:
    """Records one job's progress in ``store``.

    ``checkpoint_dir`` holds the learner's ``step-<n>`` checkpoints; ``served_version`` says
    which weight version the inference replicas serve now (None when it cannot tell)."""

    store: JobStore
    job_id: str
    checkpoint_dir: Path
    served_version: Callable[[], int | None] = lambda: None
    _checkpoints: set[str] = field(default_factory=set)
    _published: int = 0

    def record(self, record: Mapping[str, Any]) -> None:
        """One step record (as in ``metrics.jsonl``): stored with ``record_step``; then the
        checkpoints that appeared (the learner writes them before the step's record) and the
        served version, when newer than the last recorded (published before the record too)."""
        self.store.record_step(self.job_id, record)
        step = int(record["step"])
        self.record_checkpoints()
        version = self.served_version()
        if version is not None and version > self._published:
            self._published = version
            self.store.record_publish(self.job_id, version, step)

    def record_checkpoints(self) -> None:
        """``record_checkpoint`` for each complete checkpoint not recorded yet (``meta.json``
        is written last: ``axpo_learner.checkpoint``)."""
        for meta in sorted(self.checkpoint_dir.glob("step-*/meta.json")):
            path = meta.parent
            if path.name in self._checkpoints:
                continue
            self._checkpoints.add(path.name)
            try:
                at = int(json.loads(meta.read_text())["step"])
            except (OSError, ValueError, KeyError):
                continue  # pruned meanwhile (the learner keeps the newest ones only)
            self.store.record_checkpoint(self.job_id, at, str(path))
