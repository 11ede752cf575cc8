"""gRPC front of the learner (``axpo serve learner``): the only module of the service that
touches gRPC.

:func:`serve` builds everything from :class:`~axpo.settings.learner.LearnerSettings`: the queue
(``settings.queue``; a private redis-server when it has no ``redis_url``), the trainer, the
weight publisher (none without ``inference_targets``), and a :class:`LearnerLoop` that runs in
a background thread while the main thread serves ``LearnerService``. The process ends when
the loop ends: ``max_steps`` reached (exit 0), a SIGTERM/SIGINT (the loop stops after its
current step and checkpoints; exit 0), or an error in the loop (raised: non-zero exit, for the
supervisor to restart it; the restart resumes from the newest checkpoint).

Under torchrun (``torchrun --nproc-per-node N -m axpo serve learner ...``) every worker calls
:func:`serve`: the model is sharded with FSDP2 over the N processes (gloo on CPU, NCCL on
GPUs). Rank 0 does all of the above (queue, gRPC Status, metrics, publication); the other
ranks build the trainer and a queue-less loop and run it in their main thread, with
SIGTERM/SIGINT handlers that vote to stop (see ``axpo_learner.loop``). A SIGTERM to the
torchrun process group stops every rank after its current step and the final checkpoint.
torchrun itself exits non-zero when signalled, and SIGKILLs workers that outlive its
``--shutdown-timeout`` (30 s by default: give it more than a step plus a checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import grpc

from axpo.algorithm.diagnostics import DIAGNOSTIC_HELP
from axpo.queue import TrajectoryQueue, connect
from axpo.rpc.server import RunningServer, ServiceRegistration, serve_while, start_server
from axpo.settings.job import AlgorithmSpec, JobSpec, load_job_spec
from axpo.settings.learner import LearnerSettings
from axpo.telemetry.logs import configure_logging
from axpo.telemetry.metrics import StepMetrics, append_jsonl
from axpo.v1 import learner_pb2, learner_pb2_grpc
from axpo_learner import distributed
from axpo_learner.loop import LearnerLoop
from axpo_learner.loop.status import LoopStatus
from axpo_learner.publish import PathPublisher, StreamPublisher, WeightPublisher
from axpo_learner.trainer import Trainer

SERVICE_NAME = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name

log = logging.getLogger(__name__)


class _HasStatus(Protocol):
    def status(self) -> LoopStatus: ...


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """Status of a loop, or of a deployment's job runner (its current job's loop)."""

    def __init__(self, loop: _HasStatus) -> None:
        self._loop = loop

    def Status(
        self, request: learner_pb2.LearnerServiceStatusRequest, context: grpc.ServicerContext
    ) -> learner_pb2.LearnerServiceStatusResponse:
        st = self._loop.status()
        return learner_pb2.LearnerServiceStatusResponse(
            step=st.step,
            policy_version=st.published_version,
            queue_lag=max(0, st.queue_lag),
            groups_consumed=st.queue.consumed,
            groups_dropped_stale=st.queue.dropped_stale,
            groups_dead_lettered=st.queue.dead_lettered,
            last_metrics=st.last_metrics,
            job_id=st.job_id,
        )


def start(settings: LearnerSettings, loop: _HasStatus) -> RunningServer:
    """Serve ``loop``'s status (non-blocking); the caller runs the loop and stops the server."""
    servicer = LearnerServicer(loop)
    registration = ServiceRegistration(
        name=SERVICE_NAME,
        add=lambda server: learner_pb2_grpc.add_LearnerServiceServicer_to_server(servicer, server),
    )
    return start_server([registration], settings.rpc, service="learner")


def resolve_job(settings: LearnerSettings) -> tuple[str, AlgorithmSpec | JobSpec]:
    """The job id and the spec the loop runs: ``settings.job_spec`` when given, else
    ``settings.job_id`` with the default algorithm."""
    if settings.job_spec:
        spec = load_job_spec(settings.job_spec)
        return spec.name, spec
    return settings.job_id, AlgorithmSpec()


def make_publisher(settings: LearnerSettings) -> WeightPublisher | None:
    """The configured transport to ``settings.inference_targets``; None without targets."""
    if not settings.inference_targets:
        return None
    if settings.publish_transport == "stream":
        return StreamPublisher(settings.inference_targets, settings.publish_chunk_bytes)
    if not settings.publish_dir:
        raise ValueError("publish_transport 'path' needs publish_dir (a shared directory)")
    return PathPublisher(settings.inference_targets, settings.publish_dir)


def _step_metrics(settings: LearnerSettings) -> StepMetrics | None:
    if settings.metrics_port is None:
        return None
    metrics = StepMetrics(DIAGNOSTIC_HELP)
    port = metrics.start_http(settings.metrics_port)
    log.info("prometheus metrics on 127.0.0.1:%d/metrics", port)
    return metrics


def _sink(
    settings: LearnerSettings, metrics: StepMetrics | None
) -> Callable[[dict[str, float]], None] | None:
    """Where each step's record goes: the JSON-lines file and the Prometheus gauges."""
    path = Path(settings.metrics_path) if settings.metrics_path else None
    if path is None and metrics is None:
        return None

    def sink(record: dict[str, float]) -> None:
        if path is not None:
            append_jsonl(path, record)
        if metrics is not None:
            metrics.update(int(record["step"]), record)

    return sink


def serve(settings: LearnerSettings, port_file: Path | None = None) -> None:
    """Train and serve Status until the loop ends or SIGTERM/SIGINT. Writes the bound port to
    ``port_file`` once the model is loaded and the server listens. Under torchrun: see the
    module docstring (only rank 0 serves, writes ``port_file`` and publishes)."""
    configure_logging(settings.log, service="learner")
    world = distributed.init_from_env(settings.device)
    try:
        if settings.job_store:
            if world.distributed:
                raise ValueError(
                    "job_store: a deployment's learner runs as one process (not under torchrun)"
                )
            _serve_jobs(settings, port_file)
        elif world.rank == 0:
            _serve_leader(settings, port_file)
        else:
            _run_follower(settings)
    finally:
        distributed.shutdown()


def _run_follower(settings: LearnerSettings) -> None:
    """A rank other than 0: train with the others; no queue, no gRPC, no publication."""
    loops: list[LearnerLoop] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: stopping after the current step", signal.Signals(signum).name)
        stop.set()
        for loop in loops:
            loop.request_stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _, spec = resolve_job(settings)
        algorithm = spec.algorithm if isinstance(spec, JobSpec) else spec
        loop = LearnerLoop(settings, spec, None, Trainer(settings, algorithm))
        loops.append(loop)
        if stop.is_set():  # a signal while the model was loading
            loop.request_stop()
        loop.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_leader(settings: LearnerSettings, port_file: Path | None) -> None:
    job_id, spec = resolve_job(settings)
    algorithm = spec.algorithm if isinstance(spec, JobSpec) else spec
    queue_settings = settings.queue.model_copy(update={"max_policy_lag": settings.max_policy_lag})
    client, redis_server = connect(queue_settings)
    publisher: WeightPublisher | None = None
    step_metrics: StepMetrics | None = None
    try:
        queue = TrajectoryQueue(client, job_id, queue_settings)
        trainer = Trainer(settings, algorithm)
        publisher = make_publisher(settings)
        step_metrics = _step_metrics(settings)
        loop = LearnerLoop(
            settings, spec, queue, trainer, publisher, on_step=_sink(settings, step_metrics)
        )
        serve_while(
            start(settings, loop),
            loop.run,
            loop.request_stop,
            grace_s=settings.rpc.grace_s,
            name="learner loop",
            port_file=port_file,
        )
    finally:
        if publisher is not None:
            publisher.close()
        if step_metrics is not None:
            step_metrics.close()
        client.close()
        if redis_server is not None:
            redis_server.stop()


def _serve_jobs(settings: LearnerSettings, port_file: Path | None) -> None:
    """A deployment's learner (``job_store``): :class:`~axpo_learner.jobs.JobRunner` in a
    background thread, Status (of the current job; idle between jobs) in the main thread,
    until SIGTERM/SIGINT (the current job checkpoints and stays running) or an error."""
    from axpo_learner.jobs import JobRunner

    client, redis_server = connect(settings.queue)
    publisher: WeightPublisher | None = None
    step_metrics: StepMetrics | None = None
    try:
        publisher = make_publisher(settings)
        step_metrics = _step_metrics(settings)
        on_step = None
        if step_metrics is not None:
            gauges = step_metrics

            def on_step(record: dict[str, float]) -> None:
                gauges.update(int(record["step"]), record)

        runner = JobRunner(settings, client, publisher, on_step=on_step)
        serve_while(
            start(settings, runner),
            runner.run,
            runner.request_stop,
            grace_s=settings.rpc.grace_s,
            name="job runner",
            port_file=port_file,
        )
    finally:
        if publisher is not None:
            publisher.close()
        if step_metrics is not None:
            step_metrics.close()
        client.close()
        if redis_server is not None:
            redis_server.stop()
