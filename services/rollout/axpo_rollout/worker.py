"""A rollout worker: questions in (prompts stream), scored groups out (groups stream).

:class:`RolloutWorker` keeps up to ``rollout.inflight_questions`` questions sampling
(:class:`QuestionSlots`; a group that only waits on its AXPO resamples gives its place to the
next question, up to ``rollout.resampling_questions`` such groups on top): it
takes prompt tasks under its stable consumer name (after a restart its unacknowledged ones
come back first), runs each through :meth:`AgentLoop.run_group` on a thread, puts the group
(``put_group`` waits while the learner is ``max_backlog`` groups behind: backpressure), and
only then acknowledges the prompt. A crash between the put and the ack samples that question
again (at least once; the learner then sees two groups for it), never loses it. A question
whose group fails (a service error) is not acknowledged: it comes back by reclaim after
``queue.claim_idle_ms``, or as poison after ``queue.max_deliveries``... of the groups stream
only, so the worker also dead-letters a prompt after ``max_prompt_failures`` failures of its
own. Idle workers reclaim prompts of dead workers.

Stopping (:meth:`RolloutWorker.request_stop`) is prompt: no new question is taken, a group
waiting on backpressure is dropped instead of waiting for a learner that may be gone (that wait
was what held every worker for the whole stop grace period at the end of a run), and a question
whose sampling fails once the stop is requested (``axpo serve rollout`` closes the gRPC channels
to cancel them) is neither counted as failed nor dead-lettered. In both cases the prompt stays
unacknowledged in the consumer group: a worker restarted under the same consumer name reads it
again first, any other worker reclaims it after ``queue.claim_idle_ms``. Nothing is lost.

The worker also counts what it did (:class:`WorkerCounters`) for its Prometheus endpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from axpo.contracts.domain import Group
from axpo.queue import PromptDelivery, QueueFullError, TrajectoryQueue
from axpo.study.tasks import task_from_data
from axpo.telemetry.logs import log_event
from axpo_rollout.agent import AgentLoop

log = logging.getLogger("axpo.rollout")

_STOP_POLL_S = 0.5
"""How often a group waiting on backpressure looks at the stop flag."""


class Abandoned(Exception):
    """A question given up because the worker is stopping; its prompt stays unacknowledged."""


class QuestionSlots:
    """Places for questions: at most ``sampling`` sampling their originals at once, and at most
    ``sampling + resampling`` groups in all (those past their originals wait on resamples).

    Why: an AXPO group's resamples start after its originals' first turns and may run long
    after the originals are done; holding the question's place all that time would leave the
    engine with fewer sequences to batch exactly when there is extra work."""

    def __init__(self, sampling: int, resampling: int) -> None:
        if sampling < 1 or resampling < 0:
            raise ValueError(
                f"need sampling >= 1 and resampling >= 0, got {sampling}, {resampling}"
            )
        self.sampling_cap = sampling
        self.total_cap = sampling + resampling
        self._cond = threading.Condition()
        self.sampling = 0
        self.total = 0

    def free(self) -> int:
        with self._cond:
            return self._free()

    def _free(self) -> int:
        return max(0, min(self.sampling_cap - self.sampling, self.total_cap - self.total))

    def start(self, timeout: float | None = None) -> Ticket | None:
        """Take a place (waiting up to ``timeout`` seconds; None: forever), or None."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free() > 0, timeout):
                return None
            self.sampling += 1
            self.total += 1
            return Ticket(self)

    def _move(self, sampling: int, total: int) -> None:
        with self._cond:
            self.sampling += sampling
            self.total += total
            self._cond.notify_all()


class Ticket:
    """One question's place: :meth:`resampling` when only resamples are left, :meth:`done`
    at the end (either may be called more than once)."""

    def __init__(self, slots: QuestionSlots) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._state = "sampling"

    def resampling(self) -> None:
        with self._lock:
            if self._state != "sampling":
                return
            self._state = "resampling"
        self._slots._move(-1, 0)

    def done(self) -> None:
        with self._lock:
            state, self._state = self._state, "done"
        if state == "sampling":
            self._slots._move(-1, -1)
        elif state == "resampling":
            self._slots._move(0, -1)


@dataclass
class WorkerCounters:
    groups: int = 0
    rollouts: int = 0
    resampled_rollouts: int = 0
    tool_calls: int = 0
    failures: int = 0
    dead_lettered: int = 0
    abandoned: int = 0


class RolloutWorker:
    def __init__(
        self,
        loop: AgentLoop,
        queue: TrajectoryQueue,
        consumer: str,
        *,
        max_prompt_failures: int = 3,
    ) -> None:
        self.loop = loop
        self.queue = queue
        self.consumer = consumer
        self.inflight = loop.spec.rollout.inflight_questions
        self.slots = QuestionSlots(self.inflight, loop.spec.rollout.resampling_slots())
        self.max_prompt_failures = max_prompt_failures
        self.counters = WorkerCounters()
        self._failures: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, Future[Group]] = {}

    def request_stop(self) -> None:
        """Take no new question; give up those still sampling or waiting on backpressure as
        they next fail or wait (see the module docstring). :meth:`run` then returns."""
        self._stop.set()

    def run(self) -> None:
        """Until :meth:`request_stop`: keep ``inflight`` questions going. Returns once every
        question in flight has ended: finished (group put, prompt acknowledged) or abandoned
        (prompt left unacknowledged for redelivery)."""
        slots = self.slots
        with ThreadPoolExecutor(slots.total_cap, thread_name_prefix="question") as pool:
            while not self._stop.is_set():
                free = slots.free()
                if free <= 0:
                    time.sleep(0.02)
                    continue
                deliveries = self.queue.take_prompts(self.consumer, count=free, block_ms=200)
                if not deliveries and not self._running:
                    deliveries = self.queue.reclaim_prompts(self.consumer, count=free)
                for d in deliveries:
                    if d.entry_id in self._running:
                        continue  # redelivered while still in flight here
                    ticket = slots.start(timeout=0)
                    assert ticket is not None  # only this thread starts questions
                    fut = pool.submit(self._one, d, ticket)
                    with self._lock:
                        self._running[d.entry_id] = fut
                    fut.add_done_callback(lambda _f, e=d.entry_id: self._forget(e))
            for fut in list(self._running.values()):
                fut.exception()

    def _forget(self, entry_id: str) -> None:
        with self._lock:
            self._running.pop(entry_id, None)

    def _one(self, delivery: PromptDelivery, ticket: Ticket) -> Group:
        task = delivery.task
        try:
            question = task_from_data(task.data)
            group = self.loop.run_group(
                question,
                group_id=f"{self.loop.spec.name}-{task.task_id}-{delivery.entry_id}",
                on_resampling=ticket.resampling,
            )
            self._put(group)
            self.queue.ack_prompts([delivery.entry_id])
        except Exception as exc:
            if self._stop.is_set():
                # Cancelled by the stop (closed channels fail as RpcError or ValueError), or
                # dropped at backpressure: not the question's fault, so not a failure.
                self._abandoned(delivery, exc)
            else:
                self._failed(delivery, exc)
            raise
        finally:
            ticket.done()
        c = self.counters
        with self._lock:
            c.groups += 1
            c.rollouts += sum(1 for t in group.trajectories if not t.resampled_from)
            c.resampled_rollouts += sum(1 for t in group.trajectories if t.resampled_from)
            c.tool_calls += sum(len(t.tool_calls) for t in group.trajectories)
        return group

    def _put(self, group: Group) -> None:
        """``put_group`` with its backpressure wait cut into slices, so that a stop ends the
        wait (raising :class:`Abandoned`) instead of lasting ``backpressure_timeout_s``."""
        timeout_s = self.queue.settings.backpressure_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                self.queue.put_group(group, timeout_s=max(0.001, min(_STOP_POLL_S, left)))
                return
            except QueueFullError as exc:
                if self._stop.is_set():
                    raise Abandoned(
                        f"group {group.group_id}: stopping while the queue is full"
                    ) from exc
                if left <= _STOP_POLL_S:
                    raise QueueFullError(
                        f"job {self.queue.job_id}: no room for group {group.group_id} within "
                        f"{timeout_s:g} s (backpressure_timeout_s); is the learner running and "
                        "acknowledging?"
                    ) from exc

    def _abandoned(self, delivery: PromptDelivery, exc: BaseException) -> None:
        with self._lock:
            self.counters.abandoned += 1
        log_event(
            log,
            logging.INFO,
            "question abandoned at stop",
            task=delivery.task.task_id,
            entry=delivery.entry_id,
            error=f"{type(exc).__name__}: {exc}",
        )

    def _failed(self, delivery: PromptDelivery, exc: BaseException) -> None:
        with self._lock:
            self.counters.failures += 1
            self._failures[delivery.entry_id] += 1
            n = self._failures[delivery.entry_id]
        log_event(
            log,
            logging.WARNING,
            "question failed",
            task=delivery.task.task_id,
            entry=delivery.entry_id,
            failures=n,
            error=f"{type(exc).__name__}: {exc}",
        )
        if n >= self.max_prompt_failures or isinstance(exc, ValueError):
            # A bad task (ValueError: it cannot be built or sampled) or one that keeps failing.
            self.queue.dead_letter_prompts(self.consumer, [delivery.entry_id], str(exc)[:500])
            with self._lock:
                self.counters.dead_lettered += 1
