"""A deployment's rollout worker: it follows the job store (``axpo serve rollout`` with
``job_store: true``).

:class:`JobFollower` waits for the job the deployment's learner runs
(:meth:`axpo.jobs.JobStore.running_job`) to have a runtime (the learner stores it once the
job's first weights are served: :mod:`axpo_learner.jobs`), then samples for it exactly as a
worker started with its spec would (:class:`~axpo_rollout.worker.RolloutWorker` on the job's
own streams, with the job's backlog), until the job ends, is cancelled, or another job takes
the deployment; then it stops the worker promptly (its channels are closed, so questions in
flight fail at once and stay unacknowledged: nothing is lost) and waits for the next job.

A job whose checkpoint's chat template renders other tokens than the loop builds
(:func:`axpo_rollout.server.check_template`) is ended ``failed`` with the mismatch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from pydantic import ValidationError

from axpo.contracts.template_check import TemplateMismatch
from axpo.jobs import JobRecord, JobState, JobStateError, JobStore
from axpo.queue import TrajectoryQueue
from axpo.settings.job import JobSpec
from axpo.settings.rollout import RolloutSettings
from axpo.telemetry.logs import log_event
from axpo_rollout.agent import AgentLoop, Vocab
from axpo_rollout.clients import UNREACHABLE, GrpcBackend
from axpo_rollout.worker import RolloutWorker

log = logging.getLogger("axpo.rollout")

_RETRY_S = 5.0
"""Pause before following a job again after its services were not ready or its worker
failed."""


class JobFollower:
    """Samples for the deployment's running job, job after job, until :meth:`request_stop`.
    ``check_template(checkpoint, spec)`` raises TemplateMismatch for a checkpoint the loop
    cannot serve."""

    def __init__(
        self,
        settings: RolloutSettings,
        client: redis.Redis,
        check_template: Callable[[str, JobSpec], Any],
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = JobStore(client, settings.queue.key_prefix)
        self.check_template = check_template
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.worker: RolloutWorker | None = None
        """The current job's worker (None between jobs)."""
        self.jobs_followed: list[str] = []
        self._refused: set[str] = set()

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Follow jobs until a stop request."""
        poll = self.settings.job_poll_s
        while not self._stop.is_set():
            job, runtime = self._current()
            # A cancelled job stays running until the learner has checkpointed: not followed.
            if job is None or runtime is None or job.id in self._refused or job.cancel_requested:
                self._stop.wait(poll)
                continue
            self.follow(job, runtime)

    def _current(self) -> tuple[JobRecord | None, dict[str, Any] | None]:
        try:
            job = self.store.running_job()
            return job, (self.store.runtime(job.id) if job is not None else None)
        except redis.RedisError as exc:
            log.warning("job store unreachable: %s; retrying", exc)
            return None, None

    def _still_current(self, job_id: str) -> bool:
        try:
            job = self.store.running_job()
            return job is not None and job.id == job_id and not job.cancel_requested
        except redis.RedisError:
            return True  # a blip: the worker itself fails on a Redis that stays away

    def follow(self, job: JobRecord, runtime: dict[str, Any]) -> None:
        """Sample for ``job`` while it is the deployment's running job."""
        settings = self.settings
        try:
            spec = JobSpec.model_validate(job.spec)
        except ValidationError:
            self._refused.add(job.id)  # the learner fails it
            return
        checkpoint = settings.tokenizer or spec.model
        try:
            self.check_template(checkpoint, spec)
        except (TemplateMismatch, OSError, ValueError) as exc:
            self._refuse(job.id, f"rollout worker: {exc}")
            return
        backend = GrpcBackend(settings.inference, settings.tools, settings.verifier)
        loop: AgentLoop | None = None
        try:
            try:
                backend.wait_ready(settings.health_timeout_s)
                tools = backend.list_tools()
                loop = AgentLoop(backend, Vocab(checkpoint), spec, tools, seed=None)
            except UNREACHABLE as exc:
                log.warning("job %s: services not ready (%s); trying again", job.id, exc)
                self._stop.wait(_RETRY_S)
                return
            except (ValueError, OSError) as exc:  # the job's own fault: unknown tools, tokenizer
                self._refuse(job.id, f"rollout worker: job {job.id} cannot be sampled: {exc}")
                return
            try:
                self._sample(job, runtime, loop, backend)
            except redis.RedisError as exc:
                log.warning("job %s: Redis unreachable (%s); trying again", job.id, exc)
                self._stop.wait(_RETRY_S)
        finally:
            if loop is not None:
                loop.close()
            backend.close()

    def _sample(
        self, job: JobRecord, runtime: dict[str, Any], loop: AgentLoop, backend: GrpcBackend
    ) -> None:
        """Run a worker on ``job``'s streams while it is current. A worker that fails is logged
        and the job followed again after a pause: one job's trouble must not end the process
        (its supervisor would spend the deployment's restart budget on it)."""
        settings = self.settings
        queue_settings = settings.queue.model_copy(
            update={"max_backlog": int(runtime["max_backlog"])}
        )
        queue = TrajectoryQueue(self.client, job.id, queue_settings)
        queue.ensure()
        worker = RolloutWorker(loop, queue, settings.consumer_name())
        with self._lock:
            self.worker = worker
        self.jobs_followed.append(job.id)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                worker.run()
            except Exception as exc:  # logged, and the job followed again after a pause
                failure.append(exc)
                log.exception("rollout worker failed on job %s", job.id)

        thread = threading.Thread(target=run, name=f"rollout-{job.id}", daemon=True)
        thread.start()
        log_event(log, logging.INFO, "job followed", job=job.id, consumer=settings.consumer_name())
        try:
            while True:
                thread.join(settings.job_poll_s)
                if not thread.is_alive() or self._stop.is_set():
                    break
                if not self._still_current(job.id):
                    break
            worker.request_stop()
            backend.close()  # the questions in flight fail now; their prompts stay unacked
            thread.join()
        finally:
            with self._lock:
                self.worker = None
        log_event(log, logging.INFO, "job left", job=job.id)
        if failure:
            self._stop.wait(_RETRY_S)

    def _refuse(self, job_id: str, reason: str) -> None:
        """Fail a job this worker cannot sample (the learner sees it finished and stops)."""
        self._refused.add(job_id)
        log.error("%s", reason)
        try:
            self.store.finish(job_id, JobState.FAILED, reason)
        except (JobStateError, redis.RedisError) as err:
            log.error("job %s could not be failed: %s", job_id, err)
