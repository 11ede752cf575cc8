"""``axpo serve rollout``: one rollout worker process.

It waits for the inference, tool and verifier services to be healthy, asks the tool server
for its tools, then runs :class:`~axpo_rollout.worker.RolloutWorker` until SIGTERM/SIGINT,
serving only gRPC health (SERVING while the worker runs) and, when ``metrics_port`` is set,
Prometheus ``/metrics`` with the worker's counters. On a signal it stops taking questions,
cancels the ones in flight (by closing its gRPC channels: their calls fail at once) and drops
groups still waiting on backpressure, then exits 0, within about a second. Their prompts stay
unacknowledged, so nothing is lost: under the same consumer name a restarted worker samples them
again first, and other workers reclaim them after ``queue.claim_idle_ms``
(:mod:`axpo_rollout.worker`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from axpo.contracts.template_check import TemplateReport, check_chat_template
from axpo.queue import TrajectoryQueue, connect
from axpo.rpc.server import serve_while, start_server
from axpo.settings.job import JobSpec, load_job_spec
from axpo.settings.rollout import RolloutSettings
from axpo.telemetry.logs import configure_logging, log_event
from axpo_rollout.agent import AgentLoop, Vocab
from axpo_rollout.clients import GrpcBackend
from axpo_rollout.worker import RolloutWorker

log = logging.getLogger("axpo.rollout")


def _metrics(current: Callable[[], RolloutWorker | None], port: int) -> object:
    """Prometheus ``/metrics`` with the counters of ``current()``, the worker running now
    (none between a deployment's jobs; a new job's worker counts from 0)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily

    registry = CollectorRegistry()

    class _Collector:
        def collect(self) -> object:
            worker = current()
            if worker is None:
                return
            c = worker.counters
            for name, value, doc in (
                ("groups", c.groups, "groups put on the queue"),
                ("rollouts", c.rollouts, "original rollouts sampled"),
                ("resampled_rollouts", c.resampled_rollouts, "AXPO resampled rollouts"),
                ("tool_calls", c.tool_calls, "tool calls made by rollouts"),
                ("failures", c.failures, "questions that failed (service errors)"),
                ("dead_lettered", c.dead_lettered, "questions dead-lettered"),
                (
                    "abandoned",
                    c.abandoned,
                    "questions given up at a stop (prompts left unacknowledged for redelivery)",
                ),
                (
                    "speculative_resumes_launched",
                    worker.loop.speculation.launched,
                    "AXPO resumes started from first turns, before the originals were scored",
                ),
                (
                    "speculative_resumes_used",
                    worker.loop.speculation.used,
                    "speculative resumes kept (the condition held)",
                ),
                (
                    "speculative_resumes_cancelled",
                    worker.loop.speculation.cancelled,
                    "speculative resumes cancelled (a tool user was correct): discarded work",
                ),
            ):
                yield CounterMetricFamily(f"axpo_rollout_{name}", doc, value=value)

    registry.register(_Collector())  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server


def check_template(checkpoint: str, spec: JobSpec) -> TemplateReport:
    """Refuse to start (TemplateMismatch) on a checkpoint whose own chat template renders other
    tokens than the loop builds (axpo.contracts.template_check), checked with the job's system
    prompt. Before anything is started or waited on, so a wrong checkpoint fails at once; the
    sample zoom tool stands in for the tool server's schemas (rendered the same way)."""
    tools = None if spec.rollout.tools else []
    report = check_chat_template(checkpoint, system=spec.rollout.system_prompt, tools=tools)
    log_event(
        log,
        logging.INFO,
        "chat template checked",
        checkpoint=str(report.checkpoint),
        templates=list(report.sources),
        tokens=report.tokens,
        seconds=report.seconds,
    )
    return report


def serve(settings: RolloutSettings, port_file: Path | None = None) -> None:
    configure_logging(settings.log, service="rollout")
    if settings.job_store:
        _serve_jobs(settings, port_file)
        return
    if not settings.job_spec:
        raise ValueError("serve rollout: AXPO_ROLLOUT_JOB_SPEC (a job spec YAML) is required")
    spec = load_job_spec(settings.job_spec)
    check_template(settings.tokenizer or spec.model, spec)
    backend = GrpcBackend(settings.inference, settings.tools, settings.verifier)
    client, redis_server = connect(settings.queue)
    try:
        backend.wait_ready(settings.health_timeout_s)
        vocab = Vocab(settings.tokenizer or spec.model)
        loop = AgentLoop(backend, vocab, spec, backend.list_tools(), seed=None)
        queue = TrajectoryQueue(client, spec.name, settings.queue)
        queue.ensure()
        worker = RolloutWorker(loop, queue, settings.consumer_name())
        running = start_server([], settings.rpc, service="rollout")
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = _metrics(lambda: worker, settings.metrics_port)
        log_event(
            log, logging.INFO, "worker started", job=spec.name, consumer=settings.consumer_name()
        )

        def stop() -> None:
            worker.request_stop()
            # Cancel the questions in flight now instead of letting them sample to the end: at
            # the end of a run, or when the services are going away, that could take minutes.
            backend.close()

        try:
            serve_while(
                running,
                worker.run,
                stop,
                grace_s=settings.rpc.grace_s,
                name="rollout worker",
                port_file=port_file,
            )
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()  # type: ignore[attr-defined]
    finally:
        backend.close()
        client.close()
        if redis_server is not None:
            redis_server.stop()


def _serve_jobs(settings: RolloutSettings, port_file: Path | None) -> None:
    """A deployment's worker (``job_store``): :class:`~axpo_rollout.jobs.JobFollower` in a
    background thread, gRPC health in the main thread, until SIGTERM/SIGINT (the worker stops
    at once, as above) or an error."""
    from axpo_rollout.jobs import JobFollower

    client, redis_server = connect(settings.queue)
    try:
        follower = JobFollower(settings, client, check_template)
        running = start_server([], settings.rpc, service="rollout")
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = _metrics(lambda: follower.worker, settings.metrics_port)
        log_event(log, logging.INFO, "worker waiting for jobs", consumer=settings.consumer_name())
        try:
            serve_while(
                running,
                follower.run,
                follower.request_stop,
                grace_s=settings.rpc.grace_s,
                name="rollout worker",
                port_file=port_file,
            )
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()  # type: ignore[attr-defined]
    finally:
        client.close()
        if redis_server is not None:
            redis_server.stop()
