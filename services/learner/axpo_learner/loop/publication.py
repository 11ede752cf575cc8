"""When the loop publishes weights and at which version (the transport is
:mod:`axpo_learner.publish`).

Every ``publish_every`` steps, after the checkpoint; a failed publication is logged and counted,
never fatal. On start (:func:`restart_version`): restored weights are always published, at a
version above every one the replicas may serve (they refuse a version that does not increase);
a fresh start publishes only when the replicas or the record show a newer version.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from axpo_learner import checkpoint, distributed
from axpo_learner.loop.status import LoopState
from axpo_learner.publish import PublishError, WeightPublisher
from axpo_learner.trainer import Trainer

log = logging.getLogger(__name__)


def restart_version(current: int, seen: int, *, restored: bool) -> int | None:
    """The version to publish the trainer's weights at when the loop starts; None when there
    is no need. ``current`` is the trainer's version (restored from a checkpoint when
    ``restored``), ``seen`` the highest version published before (recorded, or served by a
    replica; -1 when unknown). Restored weights are always published: the replicas may serve
    weights that the crash lost. Replicas accept only a version above the one they serve."""
    if not restored and seen <= current:
        return None
    return max(current, seen + 1)


class Publication:
    """Publishes the trainer's weights: every rank gathers them, rank 0 (which alone has the
    publisher) sends them. Constructing it is a collective under torchrun."""

    def __init__(
        self,
        trainer: Trainer,
        publisher: WeightPublisher | None,
        checkpoint_dir: Path | None,
        state: LoopState,
        lock: threading.Lock,
    ) -> None:
        self.trainer = trainer
        self.publisher = publisher
        self.checkpoint_dir = checkpoint_dir
        self.leader = trainer.world.rank == 0
        self._state = state
        self._lock = lock
        # Whether steps are published: rank 0 has the publisher, every rank gathers weights.
        self.enabled = distributed.broadcast_object(publisher is not None, trainer.world)

    def republish(self, *, restored: bool) -> None:
        """On start: publish at :func:`restart_version` when needed; the trainer's
        ``policy_version`` moves to it, so a version always names one set of weights."""
        if not self.enabled:
            return
        version = None
        if self.leader:
            current = self.trainer.policy_version
            version = restart_version(current, self.seen_version(), restored=restored)
            if version is not None and version != current:
                log.info("the weights of version %d are published as version %d", current, version)
        version = distributed.broadcast_object(version, self.trainer.world)
        if version is None:
            return
        self.trainer.policy_version = version
        self.publish()

    def seen_version(self) -> int:
        """The highest version published before this start: recorded, or served; -1 if none."""
        seen: list[int] = []
        if self.checkpoint_dir is not None:
            recorded = checkpoint.last_published(self.checkpoint_dir)
            if recorded is not None:
                seen.append(recorded)
        if self.publisher is not None:
            try:
                seen += self.publisher.serving_versions()
            except PublishError as exc:
                log.warning("cannot read the versions the replicas serve: %s", exc)
        return max(seen, default=-1)

    def publish(self) -> None:
        """Gather the weights (every rank, under torchrun) and publish them from rank 0. The
        version is recorded first (``checkpoint.record_published``): a crash during the
        publication must not let a later start reuse it."""
        version = self.trainer.policy_version
        state = self.trainer.full_state_dict()
        publisher = self.publisher
        if not self.leader or publisher is None:
            return
        try:
            if self.checkpoint_dir is not None:
                checkpoint.record_published(self.checkpoint_dir, version)
            result = publisher.publish(self.trainer.model, version, state=state)
        except (PublishError, OSError) as exc:
            with self._lock:
                self._state.publish_failures += 1
            log.error("publishing version %d failed: %s", version, exc)
            return
        with self._lock:
            self._state.published_version = version
        log.info(
            "published version %d to %d replicas (%.1f MB in %.2f s)",
            version,
            result.replicas,
            result.bytes / 1e6,
            result.seconds,
        )
