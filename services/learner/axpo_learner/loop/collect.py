"""Collecting one step's groups from the queue (rank 0 only).

``take_groups`` under the stable consumer name (``LearnerSettings.consumer``; after a restart
its unacknowledged entries come back first), with the trainer's ``policy_version`` so that
stale groups are dropped (and counted) by the queue. When a take comes back empty the
collector refreshes (``touch_groups``) the entries the loop holds, then reclaims (XAUTOCLAIM)
entries that other consumers left unacknowledged for ``queue.claim_idle_ms``; an entry the
loop already holds is ignored, so a group is never in two steps. With ``step_timeout_s`` > 0,
once the step's first group has arrived the step is due after that time (a partial step).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from functools import partial

from axpo.queue import Delivery, TrajectoryQueue
from axpo.settings.learner import LearnerSettings
from axpo_learner.loop.redis_retry import RedisRetry
from axpo_learner.trainer import Trainer


class Collector:
    """Takes a step's deliveries; keeps what a stop (or a round's end) interrupted in
    :attr:`carry` for the next call."""

    def __init__(
        self,
        queue: TrajectoryQueue,
        settings: LearnerSettings,
        questions_per_step: int,
        trainer: Trainer,
        redis: RedisRetry,
        stop: threading.Event,
        interrupt: threading.Event | None = None,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.questions_per_step = questions_per_step
        self.trainer = trainer
        self._redis = redis
        self._stop = stop
        # Set by another thread to have the current collect return early (None; what was taken
        # is kept for the next call): the loop has something to do between steps.
        self._interrupt = interrupt or threading.Event()
        # Deliveries collected for a step not yet trained: one that a stop interrupted (used by
        # the next run()), or, under torchrun, one still being collected over rounds.
        self.carry: list[Delivery] = []
        # When the partial step being collected is due (``step_timeout_s``); None until its
        # first group arrives.
        self._deadline: float | None = None
        # Groups sampled before this version are dropped as stale (a deployment's job: the
        # versions before its first published weights are another job's); None: no floor.
        self.min_version: int | None = None

    def collect(
        self, uncheckpointed: Sequence[str], until: float | None = None
    ) -> list[Delivery] | None:
        """The step's deliveries; None when a stop request came first or ``until`` (a
        ``time.monotonic()``) passed: what was taken is kept for the next call.
        ``uncheckpointed`` are the entry ids of trained steps the loop still holds."""
        queue = self.queue
        need = self.questions_per_step
        got = list(self.carry)
        self.carry = []
        held = set(uncheckpointed) | {d.entry_id for d in got}
        wait_s = self.settings.step_timeout_s
        block_ms = queue.settings.block_ms
        consumer = self.settings.consumer
        while len(got) < need and not self._stop.is_set():
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                break
            if (until is not None and now >= until) or self._interrupt.is_set():
                self.carry = got
                return None
            block = block_ms
            for limit in (self._deadline, until):
                if limit is not None:
                    block = max(1, min(block or 1, int((limit - now) * 1000)))
            version = self.trainer.policy_version
            count = need - len(got)
            new = self._redis(
                partial(
                    queue.take_groups,
                    consumer,
                    count=count,
                    block_ms=block,
                    current_version=version,
                    min_version=self.min_version,
                )
            )
            if not new:
                # Refresh what this loop holds first, or reclaim would take it back (counting a
                # delivery each time, until it is dead-lettered as a poison message).
                self._redis(partial(queue.touch_groups, consumer, sorted(held)))
                new = self._redis(
                    partial(
                        queue.reclaim,
                        consumer,
                        count=count,
                        current_version=version,
                        min_version=self.min_version,
                    )
                )
                if not new and block_ms == 0:
                    time.sleep(0.01)  # no blocking read to wait in: do not spin
            for delivery in new:
                if delivery.entry_id in held:
                    continue
                held.add(delivery.entry_id)
                got.append(delivery)
            if got and self._deadline is None and wait_s > 0:
                self._deadline = time.monotonic() + wait_s
        self._deadline = None
        if self._stop.is_set():
            self.carry = got
            return None
        return got
