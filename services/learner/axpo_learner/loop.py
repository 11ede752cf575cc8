"""The learner's main loop: take groups, train, checkpoint, acknowledge, publish.

:class:`LearnerLoop` drives one :class:`~axpo_learner.trainer.Trainer` from one
:class:`~axpo.queue.TrajectoryQueue`. It touches no gRPC (the service front is
``axpo_learner.server``), so tests drive it in-process or in a subprocess they kill.

**One step.**

1. *Collect* ``questions_per_step`` groups: ``take_groups`` under the stable consumer name
   (``LearnerSettings.consumer``; after a restart its unacknowledged entries come back first),
   with ``current_version`` so that stale groups are dropped (and counted) by the queue. When a
   take comes back empty the loop also reclaims (XAUTOCLAIM) entries that other consumers left
   unacknowledged for ``queue.claim_idle_ms``. Before each reclaim, and after each step, the
   entries this loop holds (taken for the current step, or trained but not yet checkpointed)
   are *touched* (``touch_groups``: their idle time reset, no delivery counted), so no
   consumer reclaims them while they are in use; one that comes back anyway is ignored, so a
   group is never in two steps. With ``step_timeout_s`` > 0, once the step's first group has
   arrived the loop trains on whatever arrived within that time (a *partial step*, counted);
   with 0 it waits for a full step.
2. *Train*: ``trainer.train_step(groups)``, then ``trainer.policy_version += 1``. A bad group
   (one the queue accepted but the learner cannot batch: image placeholders that do not match
   its images, an image that does not decode, token ids outside the model's vocabulary...)
   never ends the loop: when ``train_step`` raises ValueError, OSError (undecodable image) or
   IndexError, each group of the step is checked alone through the trainer's batching path
   (rows, images, micro-batches; no forward, weights untouched), the offending ones are
   dead-lettered with the error as reason (counted in ``dead_lettered``, acknowledged at
   once: nothing of theirs is trained) and the step is trained on the rest (not at all when
   none is left). When no single group is at fault the error is raised as before.
3. *Checkpoint, then acknowledge*: every ``checkpoint_every`` steps (and on a graceful stop or
   at ``max_steps``) :func:`axpo_learner.checkpoint.save` writes the state atomically with the
   entry ids of every step since the previous checkpoint; only after it returns are those ids
   acknowledged (``ack_groups``). Entries of steps not yet checkpointed stay pending in Redis.
   Without ``checkpoint_dir`` the loop acknowledges right after the step (nothing is durable:
   a crash loses the updates since the start, and the groups with them).
4. *Publish* every ``publish_every`` steps (when a publisher is given), after the checkpoint.
   A failed publication is logged and counted, never fatal: replicas keep serving older
   weights, which shows as policy lag and logprob mismatch.

**Crash recovery** (:meth:`LearnerLoop.recover`, run by :meth:`LearnerLoop.run` first): load
the newest checkpoint, then acknowledge its recorded entry ids again (idempotent: a crash may
have come between the checkpoint and the ack), then take. What comes back is exactly the
groups of steps that no checkpoint covers; they are trained again on the restored weights.

**Exactly once** rests on: (a) the checkpoint is written atomically (a crash leaves it whole
or absent) and records the entry ids of precisely the steps it adds; (b) an entry is
acknowledged only after a checkpoint containing it is durable, and acknowledgements are
durable (Redis AOF with ``appendfsync always``); (c) unacknowledged entries are redelivered to
the same consumer name (or reclaimed from a dead one) and deduplicated against what this loop
holds; (d) held entries are touched before every reclaim and after every step, so a live
learner's entries are not reclaimed as long as ``claim_idle_ms`` exceeds one step's time.
The trained history is then the chain of checkpoints, each entry id in exactly one.

**Redis outages**: every queue call is retried with backoff for up to ``redis_retry_s`` (the
client reconnects; Lua scripts are reloaded), then the loop raises. An XREADGROUP whose reply
was lost leaves its entries pending: they come back by reclaim after ``claim_idle_ms`` or on
the next start.

**Stopping**: :meth:`LearnerLoop.request_stop` (any thread) ends the loop between steps; groups
collected for the unfinished step stay unacknowledged (redelivered on the next start), and the
steps trained since the last checkpoint are checkpointed and acknowledged before returning.

**Re-publication on start**: a learner that restarts from a checkpoint holds the weights of
that checkpoint, while the replicas may serve newer ones (published after it, then lost in the
crash) or older ones. With a publisher, :meth:`LearnerLoop.recover` publishes the restored
weights at once, at a version above every one the replicas may serve (they refuse a version
that does not increase): the newest of the version recorded before each publication
(``published.json`` in ``checkpoint_dir``) and the versions the replicas report
(``InferenceService.Status``), plus one, or the restored version when that is higher
(:func:`restart_version`). The trainer's ``policy_version`` moves to it, so a version always
names one set of weights and later steps publish above it. A fresh start (no checkpoint)
publishes only when the replicas or the record show a newer version than the trainer's.

**Under torchrun** (``WORLD_SIZE`` > 1, the model sharded by FSDP2): every rank runs a loop
over the same trainer code; only rank 0 has the queue (and the publisher, the gRPC front and
the metrics). The ranks advance in *rounds*: rank 0 collects for up to ``_ROUND_S`` seconds
(what it took is kept for the next round), then every rank joins two collectives, a stop vote
(any rank's stop request stops all: a SIGTERM may reach one worker only) and the broadcast of
rank 0's step (its deliveries, or none yet). So ranks block in a collective for at most a round
while the queue is empty, well inside the process group's timeout, and a stop is seen within a
round. Rank 0 checks each group through the batching path before broadcasting it and
dead-letters those that fail (a bad token id would otherwise fail the forward on one rank
only, leaving the others waiting in a collective). Every rank trains the step on its share
(:mod:`axpo_learner.distributed`), checkpoints together (each rank writes its shards; rank 0
completes the checkpoint, see :mod:`axpo_learner.checkpoint`), and gathers the full weights
for rank 0 to publish. Rank 0 alone takes, touches, acknowledges and dead-letters: the
exactly-once argument above is unchanged, since an entry is acknowledged by rank 0 only after
:func:`checkpoint.save` returned there, i.e. after every rank's shards and the metadata are
durable and renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis

from axpo import diagnostics
from axpo.config import AlgorithmSpec, JobSpec, LearnerSettings
from axpo.domain import Group
from axpo.queue import Delivery, QueueCounters, TrajectoryQueue
from axpo_learner import checkpoint, distributed
from axpo_learner.batch import micro_batches, rows_from_groups
from axpo_learner.publish import PublishError, WeightPublisher
from axpo_learner.trainer import Trainer

log = logging.getLogger(__name__)

T = TypeVar("T")

# What train_step raises on a bad group: ValueError (inconsistent input), OSError (PIL's
# UnidentifiedImageError: an image that does not decode), IndexError (a token id outside the
# embedding table, raised by the forward).
_BAD_INPUT = (ValueError, OSError, IndexError)

# Errors after which a Redis call is worth repeating (BusyLoadingError, raised while Redis
# replays its AOF, is a ConnectionError).
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError)

# Under torchrun, rank 0 collects for at most this long before the ranks meet (stop vote, step
# broadcast): the longest a rank waits in a collective while the queue is empty.
_ROUND_S = 2.0


def restart_version(current: int, seen: int, *, restored: bool) -> int | None:
    """The version to publish the trainer's weights at when the loop starts; None when there
    is no need. ``current`` is the trainer's version (restored from a checkpoint when
    ``restored``), ``seen`` the highest version published before (recorded, or served by a
    replica; -1 when unknown). Restored weights are always published: the replicas may serve
    weights that the crash lost. Replicas accept only a version above the one they serve."""
    if not restored and seen <= current:
        return None
    return max(current, seen + 1)


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
class _State:
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


class _Stopped(Exception):
    """A stop was requested while waiting on Redis."""


class LearnerLoop:
    """Consumes a job's groups and trains on them; see the module docstring.

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
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state = _State(published_version=trainer.policy_version)
        self._recovered = False
        # Entry ids of trained steps that no checkpoint covers yet (pending in Redis).
        self._uncheckpointed: list[str] = []
        # Deliveries collected for a step not yet trained: one that a stop interrupted (used by
        # the next run()), or, under torchrun, one still being collected over rounds.
        self._carry: list[Delivery] = []
        # When the partial step being collected is due (``step_timeout_s``); None until its
        # first group arrives.
        self._deadline: float | None = None
        self._wait_started: float | None = None
        # Under torchrun: the ranks agreed to stop (a local request is only a vote).
        self._agreed_stop = False
        # Whether steps are published: rank 0 has the publisher, every rank gathers weights.
        self._publishes = distributed.broadcast_object(publisher is not None, self.world)

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """End :meth:`run` after the current step (thread-safe, idempotent)."""
        self._stop.set()

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
        publish the weights when the replicas may serve others (see the module docstring;
        :meth:`run` calls it once before the first step)."""
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
        self._republish(restored=info is not None)
        return info

    def _republish(self, *, restored: bool) -> None:
        if not self._publishes:
            return
        version = None
        if self.leader:
            current = self.trainer.policy_version
            version = restart_version(current, self._seen_version(), restored=restored)
            if version is not None and version != current:
                log.info("the weights of version %d are published as version %d", current, version)
        version = distributed.broadcast_object(version, self.world)
        if version is None:
            return
        self.trainer.policy_version = version
        self._publish()

    def _seen_version(self) -> int:
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
                if self.run_step():
                    steps += 1
            self._checkpoint_and_ack()
        except _Stopped:
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
        the module docstring), on every rank; False also when the step is still incomplete."""
        if self.world.distributed:
            return self._round()
        started = time.perf_counter()
        deliveries = self._collect()
        if not deliveries:
            return False
        return self._train(deliveries, queue_wait_s=time.perf_counter() - started)

    def _stopping(self) -> bool:
        return self._agreed_stop if self.world.distributed else self._stop.is_set()

    def _round(self) -> bool:
        deliveries: list[Delivery] | None = None
        if self.leader:
            if self._wait_started is None:
                self._wait_started = time.perf_counter()
            try:
                deliveries = self._collect(until=time.monotonic() + _ROUND_S)
            except _Stopped:  # Redis is down and a stop was requested: the vote stops
                deliveries = None
        if distributed.any_rank(self._stop.is_set(), self.world):
            self._stop.set()
            self._agreed_stop = True
            if deliveries is not None:
                self._carry = deliveries  # not trained, not acknowledged: redelivered
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

    def _collect(self, until: float | None = None) -> list[Delivery] | None:
        """The step's deliveries; None when a stop request came first or ``until`` (a
        ``time.monotonic()``) passed: what was taken is kept for the next call."""
        queue = self._queue
        need = self.questions_per_step
        got = list(self._carry)
        self._carry = []
        held = set(self._uncheckpointed) | {d.entry_id for d in got}
        wait_s = self.settings.step_timeout_s
        block_ms = queue.settings.block_ms
        consumer = self.settings.consumer
        while len(got) < need and not self._stop.is_set():
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                break
            if until is not None and now >= until:
                self._carry = got
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
                )
            )
            if not new:
                # Refresh what this loop holds first, or reclaim would take it back (counting a
                # delivery each time, until it is dead-lettered as a poison message).
                self._redis(partial(queue.touch_groups, consumer, sorted(held)))
                new = self._redis(
                    partial(queue.reclaim, consumer, count=count, current_version=version)
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
            self._carry = got
            return None
        return got

    def _train(self, deliveries: list[Delivery], queue_wait_s: float = 0.0) -> bool:
        trainer = self.trainer
        t_train = time.perf_counter()
        try:
            metrics = trainer.train_step([d.group for d in deliveries])
        except _BAD_INPUT as exc:
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
            with contextlib.suppress(_Stopped):
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
        if self._publishes and trainer.step % self.settings.publish_every == 0:
            self._publish()
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
        good, bad = self._split_bad(deliveries)
        if not bad:
            raise error
        self._dead_letter(bad)
        return good

    def _screen(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Dead-letter the groups that fail the batching path alone; the others (rank 0
        under torchrun, before the step is broadcast)."""
        good, bad = self._split_bad(deliveries)
        self._dead_letter(bad)
        return good

    def _split_bad(
        self, deliveries: list[Delivery]
    ) -> tuple[list[Delivery], list[tuple[Delivery, str]]]:
        good: list[Delivery] = []
        bad: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            reason = self._batch_error(delivery.group)
            if reason is None:
                good.append(delivery)
            else:
                bad.append((delivery, reason))
        return good, bad

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

    def _batch_error(self, group: Group) -> str | None:
        """Why ``group`` alone fails the trainer's batching (the path ``train_step`` runs
        before the forward: rows, images, micro-batches) or the embedding's vocabulary; None
        when it passes. Touches no weights."""
        trainer = self.trainer
        s = trainer.settings
        enc = trainer.image_encoder
        try:
            rows = rows_from_groups(
                [group],
                trainer.spec,
                scale_by_std=s.scale_advantages_by_std,
                std_floor=s.advantage_std_floor,
                images=enc,
            )
            micro_batches(
                rows, s.micro_batch_tokens, trainer.pad_id, enc.image_token_id if enc else None
            )
        except _BAD_INPUT as exc:
            return f"{type(exc).__name__}: {exc}"
        vocab = int(trainer.model.get_input_embeddings().num_embeddings)
        for row in rows:
            top = max(row.token_ids)
            if top >= vocab or min(row.token_ids) < 0:
                return (
                    f"trajectory {row.trajectory_id}: token id {top} outside the model's "
                    f"vocabulary of {vocab}"
                )
        return None

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

    def _publish(self) -> None:
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

    # ------------------------------------------------------------------ Redis

    def _redis(self, call: Callable[[], T], *, wait: bool = False) -> T:
        """``call()``, repeated while Redis does not answer, for up to ``redis_retry_s``.
        Unless ``wait``, a stop request ends the waiting with :class:`_Stopped`."""
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return call()
            except _TRANSIENT as exc:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.settings.redis_retry_s
                    log.warning(
                        "redis unavailable, retrying for %gs: %s", self.settings.redis_retry_s, exc
                    )
                if now >= deadline:
                    raise
                if not wait and self._stop.is_set():
                    raise _Stopped from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def describe(status: LoopStatus) -> dict[str, Any]:
    """The status as plain JSON-able values (logs, the CLI)."""
    return asdict(status)
