"""The learner's main loop: take groups, train, checkpoint, acknowledge, publish.

:class:`LearnerLoop` drives one :class:`~axpo_learner.trainer.Trainer` from one
:class:`~axpo.queue.TrajectoryQueue`; it touches no gRPC (the front is ``axpo_learner.server``).
The step in order, exactly-once, crash recovery and torchrun rounds: services/learner/README.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import redis

from axpo.algorithm import diagnostics
from axpo.queue import Delivery, QueueCounters, TrajectoryQueue
from axpo.settings.job import AlgorithmSpec, JobSpec
from axpo.settings.learner import LearnerSettings
from axpo_learner import checkpoint, distributed
from axpo_learner.loop.bad_groups import BAD_INPUT, split_bad
from axpo_learner.loop.collect import Collector
from axpo_learner.loop.publication import Publication
from axpo_learner.loop.redis_retry import RedisRetry, Stopped
from axpo_learner.loop.status import LoopState, LoopStatus
from axpo_learner.publish import WeightPublisher
from axpo_learner.sft.export import export_checkpoint
from axpo_learner.trainer import Trainer

log = logging.getLogger(__name__)

# Under torchrun, rank 0 collects for at most this long before the ranks meet (stop vote, step
# broadcast): the longest a rank waits in a collective while the queue is empty.
_ROUND_S = 2.0


class LearnerLoop:
    """Consumes a job's groups and trains on them; see services/learner/README.md.

    ``spec`` may be the job's :class:`JobSpec` (its ``questions_per_step`` and ``steps`` are
    used, and its ``name`` must be the queue's job) or an :class:`AlgorithmSpec` (then
    ``settings.questions_per_step`` and ``settings.max_steps``). The algorithm itself is the
    trainer's. The loop owns none of its collaborators: the caller closes them.

    Under torchrun every rank makes one, at the same time (the constructor is a collective);
    ranks other than 0 pass no queue, no publisher and no ``on_step``.
    """

    def __init__(
        self,
        settings: LearnerSettings,
        spec: AlgorithmSpec | JobSpec,
        queue: TrajectoryQueue | None,
        trainer: Trainer,
        publisher: WeightPublisher | None = None,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.world = trainer.world
        self.leader = self.world.rank == 0
        if self.leader and queue is None:
            raise ValueError("the loop of rank 0 needs the queue")
        if isinstance(spec, JobSpec):
            if queue is not None and spec.name != queue.job_id:
                raise ValueError(f"job spec {spec.name!r} but the queue is job {queue.job_id!r}")
            self.questions_per_step = spec.questions_per_step
            self.max_steps = spec.steps
        else:
            self.questions_per_step = settings.questions_per_step
            self.max_steps = settings.max_steps
        backlog = queue.settings.max_backlog if queue is not None else 0
        every = settings.checkpoint_every
        if self.max_steps:
            every = min(every, self.max_steps)  # the last step is always checkpointed
        if settings.checkpoint_dir and backlog and backlog < self.questions_per_step * every:
            # Groups are acknowledged only at a checkpoint and unacknowledged groups fill the
            # producers' backlog: producers that respect it block, and the learner waits for
            # groups they cannot put (unless a stop request ends the step first).
            log.warning(
                "queue.max_backlog %d < questions_per_step %d x steps between checkpoints %d: "
                "rollout workers will block before the next checkpoint and the learner will "
                "wait for groups they cannot put; raise max_backlog or checkpoint more often",
                backlog,
                self.questions_per_step,
                every,
            )
        self.settings = settings
        self.queue = queue
        self.trainer = trainer
        self.publisher = publisher
        self.on_step = on_step
        self.checkpoint_dir = Path(settings.checkpoint_dir) if settings.checkpoint_dir else None
        if settings.export_dir and not (Path(settings.model) / "config.json").is_file():
            raise ValueError(
                f"export_dir needs model to be a local checkpoint directory, got {settings.model!r}"
            )
        self._stop = threading.Event()
        self._republish = threading.Event()
        self._lock = threading.Lock()
        self._state = LoopState(published_version=trainer.policy_version)
        self._recovered = False
        self._redis = RedisRetry(settings.redis_retry_s, self._stop)
        # Entry ids of trained steps that no checkpoint covers yet (pending in Redis).
        self._uncheckpointed: list[str] = []
        # Rank 0 takes the groups; the other ranks get each step from it.
        self._collector = (
            Collector(
                queue,
                settings,
                self.questions_per_step,
                trainer,
                self._redis,
                self._stop,
                self._republish,
            )
            if queue is not None
            else None
        )
        self._wait_started: float | None = None
        # Under torchrun: the ranks agreed to stop (a local request is only a vote).
        self._agreed_stop = False
        self._publication = Publication(
            trainer, publisher, self.checkpoint_dir, self._state, self._lock
        )

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """End :meth:`run` after the current step (thread-safe, idempotent)."""
        self._stop.set()

    def request_republish(self) -> None:
        """Publish the current weights again, above every version served, before the next step
        (thread-safe): a replica restarted and serves its starting weights. One process only
        (under torchrun the publication is a collective the other ranks would not join)."""
        if self.world.distributed:
            raise RuntimeError("request_republish: not under torchrun")
        self._republish.set()

    def set_min_group_version(self, version: int | None) -> None:
        """Drop groups sampled before ``version`` as stale (a deployment's job: the versions
        before its first published weights are another job's); None: no floor. Rank 0."""
        self._leader_collector().min_version = version

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def done(self) -> bool:
        """True once ``max_steps`` steps are trained (never when ``max_steps`` is 0)."""
        return bool(self.max_steps) and self.trainer.step >= self.max_steps

    def status(self) -> LoopStatus:
        """A snapshot for Status (thread-safe; reads the queue's size and counters from Redis,
        keeping the last known values when Redis does not answer)."""
        fresh: tuple[int, QueueCounters] | None = None
        if self.queue is not None:
            with contextlib.suppress(redis.RedisError):
                fresh = self.queue.backlog(), self.queue.counters()
        with self._lock:
            st = self._state
            if fresh is not None:
                st.queue_lag, st.queue = fresh
            return LoopStatus(
                job_id=self.queue.job_id if self.queue is not None else "",
                step=self.trainer.step,
                policy_version=self.trainer.policy_version,
                published_version=(
                    st.published_version if self.publisher else self.trainer.policy_version
                ),
                groups_trained=st.groups_trained,
                partial_steps=st.partial_steps,
                groups_dead_lettered=st.groups_dead_lettered,
                publish_failures=st.publish_failures,
                last_metrics=dict(st.last_metrics),
                queue_lag=st.queue_lag,
                queue=st.queue,
                running=st.running,
                error=st.error,
            )

    # ------------------------------------------------------------------ running

    @property
    def _queue(self) -> TrajectoryQueue:
        if self.queue is None:
            raise RuntimeError("only the loop of rank 0 uses the queue")
        return self.queue

    def recover(self) -> checkpoint.CheckpointInfo | None:
        """Restore the newest checkpoint, acknowledge the entries it records (idempotent), and
        publish the weights when the replicas may serve others (see
        :mod:`axpo_learner.loop.publication`; :meth:`run` calls it once before the first
        step)."""
        self._recovered = True
        info = None
        if self.checkpoint_dir is not None:
            info = checkpoint.load_latest(self.trainer, self.checkpoint_dir)
        if info is not None:
            with self._lock:
                self._state.published_version = info.policy_version
            if self.leader:
                ids = info.consumed_entry_ids
                acked = self._redis(lambda: self._queue.ack_groups(ids), wait=True)
                log.info(
                    "resumed from %s: step %d, version %d (%d of its %d entries were still "
                    "unacked)",
                    info.path,
                    info.step,
                    info.policy_version,
                    acked,
                    len(ids),
                )
        self._publication.republish(restored=info is not None)
        return info

    def run(self) -> int:
        """Train until ``max_steps`` or a stop request; returns the steps trained by this
        call. Raises what the trainer raises, or a Redis error after ``redis_retry_s``."""
        with self._lock:
            self._state.running = True
            self._state.error = ""
        steps = 0
        try:
            if not self._recovered:
                self.recover()
            while not self._stopping() and not self.done():
                if self._republish.is_set():
                    self._republish.clear()
                    self._publication.republish(restored=True)
                if self.run_step():
                    steps += 1
            self._checkpoint_and_ack()
            if self.done() and self.settings.export_dir:
                self._export()
        except Stopped:
            self._checkpoint_and_ack()
        except BaseException as exc:
            with self._lock:
                self._state.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            with self._lock:
                self._state.running = False
        return steps

    def run_step(self) -> bool:
        """Collect one step's groups and train on them; False when a stop came first or every
        group of the step was dead-lettered (no step trained). Under torchrun: one round (see
        :meth:`_round`), on every rank; False also when the step is still incomplete."""
        if self.world.distributed:
            return self._round()
        started = time.perf_counter()
        deliveries = self._collect()
        if not deliveries:
            return False
        return self._train(deliveries, queue_wait_s=time.perf_counter() - started)

    def _export(self) -> None:
        """Write the final policy as an HF checkpoint to ``export_dir`` (a collective under
        torchrun: every rank gathers, rank 0 writes)."""
        tensors = self.trainer.full_state_dict()
        if tensors is None:
            return
        out = Path(self.settings.export_dir)
        export_checkpoint(tensors, Path(self.settings.model), out)
        log.info("exported the step-%d policy to %s", self.trainer.step, out)

    def _stopping(self) -> bool:
        return self._agreed_stop if self.world.distributed else self._stop.is_set()

    def _round(self) -> bool:
        """Under torchrun: rank 0 collects for up to ``_ROUND_S``, then every rank joins the
        stop vote and the broadcast of rank 0's step (its screened deliveries, or none yet)."""
        deliveries: list[Delivery] | None = None
        if self.leader:
            if self._wait_started is None:
                self._wait_started = time.perf_counter()
            try:
                deliveries = self._collect(until=time.monotonic() + _ROUND_S)
            except Stopped:  # Redis is down and a stop was requested: the vote stops
                deliveries = None
        if distributed.any_rank(self._stop.is_set(), self.world):
            self._stop.set()
            self._agreed_stop = True
            if deliveries is not None:
                self._leader_collector().carry = deliveries  # not trained: redelivered
            return False
        if deliveries is not None:
            deliveries = self._screen(deliveries)
        plan = distributed.broadcast_object(deliveries, self.world)
        if plan is None:
            return False
        queue_wait_s = 0.0
        if self._wait_started is not None:
            queue_wait_s = time.perf_counter() - self._wait_started
            self._wait_started = None
        if not plan:
            return False
        return self._train(plan, queue_wait_s=queue_wait_s)

    # ------------------------------------------------------------------ the step

    def _leader_collector(self) -> Collector:
        if self._collector is None:
            raise RuntimeError("only the loop of rank 0 uses the queue")
        return self._collector

    def _collect(self, until: float | None = None) -> list[Delivery] | None:
        """The step's deliveries (see :class:`~axpo_learner.loop.collect.Collector`); None
        when a stop request came first or ``until`` passed."""
        return self._leader_collector().collect(self._uncheckpointed, until)

    def _train(self, deliveries: list[Delivery], queue_wait_s: float = 0.0) -> bool:
        trainer = self.trainer
        t_train = time.perf_counter()
        try:
            metrics = trainer.train_step([d.group for d in deliveries])
        except BAD_INPUT as exc:
            if self.world.distributed:
                raise  # rank 0 checked every group alone before the step: not a group's fault
            deliveries = self._drop_bad_groups(deliveries, exc)
            if not deliveries:
                return False
            metrics = trainer.train_step([d.group for d in deliveries])
        train_s = time.perf_counter() - t_train
        trained_version = trainer.policy_version
        trainer.policy_version += 1
        self._uncheckpointed.extend(d.entry_id for d in deliveries)
        if self.leader:
            # Still held until a checkpoint covers them: keep other consumers from reclaiming.
            touch = partial(self._queue.touch_groups, self.settings.consumer, self._uncheckpointed)
            # When Redis is down and a stop came, they are acknowledged at the final checkpoint.
            with contextlib.suppress(Stopped):
                self._redis(touch)
        with self._lock:
            st = self._state
            st.groups_trained += len(deliveries)
            st.partial_steps += len(deliveries) < self.questions_per_step
            st.last_metrics = dict(metrics)
        t_ckpt = time.perf_counter()
        if self.checkpoint_dir is None:
            if self.leader:
                self._ack(self._uncheckpointed)
            self._uncheckpointed = []
        elif trainer.step % self.settings.checkpoint_every == 0 or self.done():
            self._checkpoint_and_ack()
        checkpoint_s = time.perf_counter() - t_ckpt
        t_pub = time.perf_counter()
        if self._publication.enabled and trainer.step % self.settings.publish_every == 0:
            self._publication.publish()
        publish_s = time.perf_counter() - t_pub
        if self.on_step is not None:
            groups = [d.group for d in deliveries]
            now = time.time()
            record: dict[str, float] = {
                "step": float(trainer.step),
                "policy_version": float(trainer.policy_version),
                **{k: float(v) for k, v in metrics.items()},
                **diagnostics.step_diagnostics(groups, learner_version=trained_version),
                "queue_wait_s": queue_wait_s,
                "train_s": train_s,
                "checkpoint_s": checkpoint_s,
                "publish_s": publish_s,
                "group_age_s": sum(now - g.created_at for g in groups) / len(groups),
                "time": now,
            }
            try:
                self.on_step(record)
            except Exception:  # metrics must never stop training
                log.exception("step metrics sink failed")
        return True

    def _drop_bad_groups(self, deliveries: list[Delivery], error: BaseException) -> list[Delivery]:
        """After ``train_step`` raised ``error``: dead-letter the groups that fail alone and
        return the others; re-raise ``error`` when none does (it is not the input's fault)."""
        good, bad = split_bad(self.trainer, deliveries)
        if not bad:
            raise error
        self._dead_letter(bad)
        return good

    def _screen(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Dead-letter the groups that fail the batching path alone; the others (rank 0
        under torchrun, before the step is broadcast)."""
        good, bad = split_bad(self.trainer, deliveries)
        self._dead_letter(bad)
        return good

    def _dead_letter(self, bad: list[tuple[Delivery, str]]) -> None:
        if not bad:
            return
        for delivery, reason in bad:
            reason = f"learner cannot train on group {delivery.group.group_id}: {reason}"
            log.error("dead-lettering entry %s: %s", delivery.entry_id, reason)
            self._redis(
                partial(
                    self._queue.dead_letter_groups,
                    self.settings.consumer,
                    [delivery.entry_id],
                    reason,
                ),
                wait=True,
            )
        with self._lock:
            self._state.groups_dead_lettered += len(bad)

    def _checkpoint_and_ack(self) -> None:
        """Checkpoint the steps trained since the last checkpoint, then acknowledge them (under
        torchrun: every rank saves, rank 0 acknowledges once the checkpoint is complete)."""
        if not self._uncheckpointed:
            return
        ids = list(self._uncheckpointed)
        if self.checkpoint_dir is not None:
            info = checkpoint.save(
                self.trainer, self.checkpoint_dir, ids, keep=self.settings.keep_checkpoints
            )
            if self.leader:
                log.info("checkpoint %s (%d entries)", info.path, len(ids))
        if self.leader:
            self._ack(ids)
        self._uncheckpointed = []

    def _ack(self, ids: list[str]) -> None:
        # Must not be abandoned on a stop request: the step is durable, so is its ack.
        self._redis(lambda: self._queue.ack_groups(ids), wait=True)
