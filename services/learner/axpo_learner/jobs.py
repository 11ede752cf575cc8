"""A deployment's learner: jobs from the job store (``axpo serve learner`` with
``job_store: true``).

:class:`JobRunner` claims the oldest queued job (:meth:`axpo.jobs.JobStore.claim_next`: one
job at a time per deployment; a job left ``running`` by a crashed learner comes back first and
resumes from its checkpoint), checks it (a valid spec, the deployment's model), marks it
``running`` and trains it:

- **Settings.** The job's ``steps``, ``questions_per_step``, ``seed``, ``algorithm`` and the
  fields of its ``run.learner`` (``lr``, ``kl_coef``, ``checkpoint_every`` ...) over the
  deployment's :class:`~axpo.settings.learner.LearnerSettings`; the fields in
  :data:`DEPLOYMENT_FIELDS` (where the model, the queue, the replicas and the files are)
  stay the deployment's, and a job setting one of them is told so in the log.
- **Files.** ``<jobs_dir>/<job id>/``: ``config.yaml`` (the spec), ``metrics.jsonl``,
  ``checkpoints/``, ``final-model/`` (the exported policy), then ``report.md`` with plots
  and ``summary.json``, as ``axpo run`` writes them.
- **Queue.** The job's own streams (named by the job id, so two jobs of the same name never
  share groups). The learner feeds the questions (:class:`~axpo.jobs.feeder.PromptFeeder`).
- **Weights.** At the start the loop publishes the job's starting weights above every version
  the replicas served (another job's weights: :mod:`axpo_learner.loop.publication`), and
  stores that version with the queue's backlog as the job's runtime
  (:meth:`~axpo.jobs.JobStore.start_runtime`). Rollout workers start sampling only then;
  groups of older versions are dropped as stale all the same.
- **Progress.** Each step record, checkpoint and publication goes to the store
  (:class:`~axpo.jobs.progress.JobProgress`), where the api reads them.
- **End.** After ``steps`` steps the job ``succeeded``; a cancel through the api (its flag,
  polled every ``job_poll_s``) stops the loop after its step, checkpoints and ends it
  ``cancelled``; an error ends it ``failed`` with the message, and the learner takes the
  next job. A SIGTERM stops the loop after its step and checkpoints, and leaves the job
  ``running`` for the learner's next start.

Rank 0 only: under torchrun a deployment's learner is refused (one process per job runner).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import yaml
from pydantic import ValidationError

from axpo.jobs import JobRecord, JobState, JobStateError, JobStore
from axpo.jobs.feeder import PromptFeeder
from axpo.jobs.progress import JobProgress
from axpo.queue import QueueCounters, TrajectoryQueue
from axpo.settings.base import format_validation_error
from axpo.settings.job import JobSpec
from axpo.settings.learner import LearnerSettings
from axpo.telemetry.metrics import append_jsonl
from axpo_learner.loop import LearnerLoop
from axpo_learner.loop.status import LoopStatus
from axpo_learner.publish import PublishError, WeightPublisher
from axpo_learner.trainer import Trainer

log = logging.getLogger(__name__)

DEPLOYMENT_FIELDS = frozenset(
    {
        "rpc",
        "log",
        "model",
        "model_name",
        "device",
        "job_id",
        "job_spec",
        "job_store",
        "jobs_dir",
        "job_poll_s",
        "queue",
        "consumer",
        "inference_targets",
        "publish_transport",
        "publish_dir",
        "publish_chunk_bytes",
        "checkpoint_dir",
        "export_dir",
        "metrics_path",
        "metrics_port",
        "redis_retry_s",
        "max_policy_lag",
        "reference_placement",
    }
)
"""Learner settings a job cannot change: they say where the deployment's model, queue,
replicas and files are."""


_RETRY_S = 5.0
"""Pause before a job left running (Redis or the replicas unreachable) is taken up again."""


_VERSION_CHECK_S = 5.0
"""How often a running job's learner asks the replicas which version they serve."""


class RetryLater(RuntimeError):
    """The job cannot go on now for a reason not its own; it stays running, taken up again
    after :data:`_RETRY_S` from its checkpoint."""


def _empty_device_cache() -> None:
    """Give the finished job's cached CUDA memory back (the next job's model needs it)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class JobRefused(ValueError):
    """A job this deployment cannot run; the message says why (it ends the job ``failed``)."""


def job_settings(
    settings: LearnerSettings, spec: JobSpec, job_id: str, job_dir: Path
) -> tuple[LearnerSettings, list[str]]:
    """The settings one job trains with (see the module docstring), and the names of the
    deployment fields its ``run.learner`` tried to set (ignored). Raises JobRefused when the
    job's learner fields are invalid."""
    ignored = sorted(set(spec.run.learner) & DEPLOYMENT_FIELDS)
    values: dict[str, Any] = settings.model_dump()
    values.update({k: v for k, v in spec.run.learner.items() if k not in DEPLOYMENT_FIELDS})
    values.update(
        job_id=job_id,
        job_spec="",
        job_store=False,
        seed=spec.seed,
        questions_per_step=spec.questions_per_step,
        max_steps=spec.steps,
        checkpoint_dir=str(job_dir / "checkpoints"),
        export_dir=str(job_dir / "final-model"),
        metrics_path=str(job_dir / "metrics.jsonl"),
    )
    try:
        return LearnerSettings.model_validate(values), ignored
    except ValidationError as exc:
        raise JobRefused(f"run.learner:\n{format_validation_error(exc)}") from None


def queue_backlog(spec: JobSpec, settings: LearnerSettings) -> int:
    """The job's groups backlog: the groups of the steps between two checkpoints (groups are
    acknowledged only at a checkpoint) plus two steps, as ``axpo run`` sets it."""
    every = min(settings.checkpoint_every, spec.steps)
    return spec.questions_per_step * (every + 2)


def check_model(settings: LearnerSettings, spec: JobSpec) -> None:
    """JobRefused unless the job's ``model`` is the deployment's (its directory, the same
    directory by another path, or ``model_name``)."""
    names = {settings.model, settings.model_name} - {""}
    if spec.model in names:
        return
    with contextlib.suppress(OSError):
        if Path(spec.model).resolve() == Path(settings.model).resolve():
            return
    served = " or ".join(repr(n) for n in sorted(names))
    raise JobRefused(
        f"model {spec.model!r}: this deployment serves {served}; submit the job with that "
        "model (a deployment serves one model)"
    )


def idle_status() -> LoopStatus:
    """Status of a learner with no job."""
    return LoopStatus(
        job_id="",
        step=0,
        policy_version=0,
        published_version=0,
        groups_trained=0,
        partial_steps=0,
        groups_dead_lettered=0,
        publish_failures=0,
        last_metrics={},
        queue_lag=0,
        queue=QueueCounters(),
        running=False,
        error="",
    )


class JobRunner:
    """Runs the deployment's jobs one after another until :meth:`request_stop` (see the module
    docstring). ``on_step`` also gets every step record (the Prometheus gauges)."""

    def __init__(
        self,
        settings: LearnerSettings,
        client: redis.Redis,
        publisher: WeightPublisher | None,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        if not settings.jobs_dir:
            raise ValueError("job_store needs jobs_dir: where each job's files go")
        self.settings = settings
        self.client = client
        self.store = JobStore(client, settings.queue.key_prefix)
        self.publisher = publisher
        self.on_step = on_step
        self.jobs_dir = Path(settings.jobs_dir)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._loop: LearnerLoop | None = None
        self.jobs_run = 0
        """Jobs this runner took to an end (succeeded, failed or cancelled)."""

    def request_stop(self) -> None:
        """Stop after the current step (the job stays running for the next start)."""
        self._stop.set()
        with self._lock:
            if self._loop is not None:
                self._loop.request_stop()

    def status(self) -> LoopStatus:
        with self._lock:
            loop = self._loop
        return loop.status() if loop is not None else idle_status()

    def run(self) -> None:
        """Take jobs until a stop request; idle ``job_poll_s`` between looks."""
        log.info("waiting for jobs (job store %s)", self.store.prefix)
        while not self._stop.is_set():
            try:
                job = self.store.claim_next()
            except redis.RedisError as exc:
                log.warning("job store unreachable: %s; retrying", exc)
                job = None
            if job is None:
                self._stop.wait(self.settings.job_poll_s)
                continue
            self.run_job(job)

    def run_job(self, job: JobRecord) -> JobState | None:
        """Train ``job`` to its end; returns its final state, or None when it is left running
        (a stop request; Redis or the replicas unreachable: taken up again after a pause,
        from its checkpoint)."""
        try:
            return self._run_job(job)
        except (redis.RedisError, RetryLater) as exc:
            log.warning("job %s left running: %s; taken up again in %.0f s", job.id, exc, _RETRY_S)
            self._stop.wait(_RETRY_S)
            return None

    def _run_job(self, job: JobRecord) -> JobState | None:
        log.info("job %s claimed (%s)", job.id, job.state)
        try:
            spec = JobSpec.model_validate(job.spec)
        except ValidationError as exc:
            return self._end(job.id, JobState.FAILED, "invalid job spec:\n" + str(exc))
        job_dir = self.jobs_dir / job.id
        try:
            check_model(self.settings, spec)
            settings, ignored = job_settings(self.settings, spec, job.id, job_dir)
        except JobRefused as exc:
            return self._end(job.id, JobState.FAILED, str(exc))
        if ignored:
            log.warning(
                "job %s: run.learner sets %s, which the deployment decides: ignored",
                job.id,
                ", ".join(ignored),
            )
        try:
            self.store.mark_running(job.id)
        except JobStateError as exc:  # cancelled while queued, between claim and start
            log.info("job %s not started: %s", job.id, exc)
            return None
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "config.yaml").write_text(yaml.safe_dump(job.spec, sort_keys=False))
        try:
            state = self._train(job.id, spec, settings, job_dir)
        except (redis.RedisError, RetryLater):
            raise  # not the job's fault: it stays running
        except Exception as exc:
            log.exception("job %s failed", job.id)
            return self._end(job.id, JobState.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._loop = None
            gc.collect()  # the job's model and optimizer states, before the next job's
            _empty_device_cache()
        if state is None:
            return None
        try:
            self._write_summary(job.id, spec, job_dir, state)
        except Exception:  # the job is trained: a summary that cannot be written is logged
            log.exception("job %s: summary.json could not be written", job.id)
        return self._end(job.id, state)

    def _train(
        self, job_id: str, spec: JobSpec, settings: LearnerSettings, job_dir: Path
    ) -> JobState | None:
        backlog = queue_backlog(spec, settings)
        queue_settings = settings.queue.model_copy(
            update={"max_backlog": backlog, "max_policy_lag": settings.max_policy_lag}
        )
        queue = TrajectoryQueue(self.client, job_id, queue_settings)
        queue.ensure()
        trainer = Trainer(settings, spec.algorithm)
        progress = JobProgress(self.store, job_id, job_dir / "checkpoints")
        metrics_path = job_dir / "metrics.jsonl"

        def on_step(record: dict[str, float]) -> None:
            append_jsonl(metrics_path, record)
            if self.on_step is not None:
                self.on_step(record)
            progress.record(record)

        loop = LearnerLoop(
            settings,
            spec.model_copy(update={"name": job_id}),
            queue,
            trainer,
            self.publisher,
            on_step=on_step,
        )
        progress.served_version = lambda: loop.status().published_version
        with self._lock:
            self._loop = loop
        if self._stop.is_set():
            return None
        if self.publisher is not None:
            # The job's first weights go above every version the replicas served: that needs
            # their versions (unknown, a new job would train on the last job's samples).
            try:
                self.publisher.serving_versions()
            except PublishError as exc:
                raise RetryLater(f"the inference replicas do not answer: {exc}") from exc
        loop.recover()
        if self.publisher is not None and loop.status().published_version != (
            trainer.policy_version
        ):
            raise RetryLater(f"weights version {trainer.policy_version} could not be published")
        runtime = self.store.start_runtime(
            job_id, {"base_version": trainer.policy_version, "max_backlog": backlog}
        )
        loop.set_min_group_version(int(runtime["base_version"]))
        progress.record_checkpoints()  # those of an earlier start
        log.info(
            "job %s: %d steps from step %d, weights version %d (first of the job: %d)",
            job_id,
            spec.steps,
            trainer.step,
            trainer.policy_version,
            runtime["base_version"],
        )
        cancelled = threading.Event()
        ended = threading.Event()
        watcher = threading.Thread(
            target=self._watch,
            args=(job_id, PromptFeeder(queue, spec), loop, cancelled, ended),
            name="job-watch",
            daemon=True,
        )
        watcher.start()
        try:
            loop.run()
        finally:
            loop.request_stop()  # ends the watcher
            watcher.join()
        progress.record_checkpoints()  # the one written when the loop stopped
        if ended.is_set():  # failed by a rollout worker, or by hand
            return self.store.get(job_id).state
        if loop.done() and not cancelled.is_set():
            return JobState.SUCCEEDED
        if cancelled.is_set() or self.store.cancel_requested(job_id):
            return JobState.CANCELLED
        return None  # a stop request: the job stays running

    def _watch(
        self,
        job_id: str,
        feeder: PromptFeeder,
        loop: LearnerLoop,
        cancelled: threading.Event,
        ended: threading.Event,
    ) -> None:
        """While the loop trains: keep its questions fed; stop it on a cancel, or when the job
        ended elsewhere (a rollout worker that cannot sample it fails it); have it publish
        again when a replica serves an older version than it published (a restarted inference
        service serves its starting weights: their groups would all be dropped as stale)."""
        next_version_check = time.monotonic() + _VERSION_CHECK_S
        while not loop.stopping and not loop.done():
            try:
                feeder.top_up()
                if self.publisher is not None and time.monotonic() >= next_version_check:
                    next_version_check = time.monotonic() + _VERSION_CHECK_S
                    self._check_served_versions(job_id, loop)
                job = self.store.get(job_id)
                if job.state.finished:
                    log.warning("job %s ended %s elsewhere; stopping", job_id, job.state)
                    ended.set()
                    loop.request_stop()
                    return
                if job.cancel_requested:
                    log.info("job %s: cancel requested; stopping after this step", job_id)
                    cancelled.set()
                    loop.request_stop()
                    return
            except redis.RedisError as exc:  # the loop itself retries and gives up
                log.warning("job %s: job store unreachable: %s", job_id, exc)
            time.sleep(min(self.settings.job_poll_s, 0.5))

    def _check_served_versions(self, job_id: str, loop: LearnerLoop) -> None:
        assert self.publisher is not None
        try:
            served = self.publisher.serving_versions(timeout_s=2.0)
        except PublishError:
            return  # down or starting: asked again later
        published = loop.status().published_version
        if served and min(served) < published:
            log.warning(
                "job %s: a replica serves version %d below the published %d (restarted?): "
                "publishing again",
                job_id,
                min(served),
                published,
            )
            loop.request_republish()

    def _write_summary(self, job_id: str, spec: JobSpec, job_dir: Path, state: JobState) -> None:
        """``report.md`` (with plots) and ``summary.json`` in the job's folder; a report that
        cannot be written is logged, not fatal."""
        from axpo.study.report import load_metrics, write_report

        metrics = job_dir / "metrics.jsonl"
        summary: dict[str, Any] = {
            "job_id": job_id,
            "state": str(state),
            "steps": len(load_metrics(metrics)) if metrics.exists() else 0,
            "metrics": str(metrics),
            "checkpoints": str(job_dir / "checkpoints"),
        }
        if (job_dir / "final-model").is_dir():
            summary["final_model"] = str(job_dir / "final-model")
        if metrics.exists():
            try:
                title = f"axpo job {job_id}: {spec.name} ({spec.algorithm.name})"
                config = (job_dir / "config.yaml").read_text()
                summary["report"] = str(write_report(job_dir, title=title, config_text=config))
            except Exception:
                log.exception("job %s: the report could not be written", job_id)
        (job_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def _end(self, job_id: str, state: JobState, error: str | None = None) -> JobState:
        """End the job as ``state`` unless it ended already (failed by hand, say)."""
        self.jobs_run += 1
        try:
            if not self.store.get(job_id).state.finished:
                self.store.finish(job_id, state, error)
        except (JobStateError, redis.RedisError) as exc:
            log.error("job %s could not be recorded as %s: %s", job_id, state, exc)
        log.info("job %s %s%s", job_id, state, f": {error}" if error else "")
        return state
