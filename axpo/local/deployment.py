"""``axpo deploy``: a deployment on this machine, as local processes: what ``compose.yaml``
runs in containers, with the same ``axpo serve`` entry points and ``AXPO_*`` settings.

It starts Redis (AOF in ``<dir>/redis``), the api (a token made here in ``<dir>/api-token``,
mode 0600, unless ``AXPO_API_TOKENS`` is set; its URL in ``<dir>/api-url``), the verifier,
tool and inference services, then the learner and the rollout workers in job-store mode
(``AXPO_LEARNER_JOB_STORE``, ``AXPO_ROLLOUT_JOB_STORE``: :mod:`axpo_learner.jobs`,
:mod:`axpo_rollout.jobs`), and waits. Jobs come through the api (``axpo job submit``, the
Python client) and run one at a time; each job's files go to ``<dir>/jobs/<job id>/``.

Every process is supervised (``--max-restarts``, with backoff; a process that ran 10 minutes
gets its budget back): a learner that dies mid-job is started again and resumes the job from
its checkpoint; a rollout worker's unacknowledged questions come back to it; an inference
service started again serves its starting weights until the job's learner, which asks the
replicas their version every few seconds, publishes the job's weights again. A spent restart
budget stops the deployment with the process's log tail. SIGINT/SIGTERM stop every
process (the learner checkpoints first; a running job stays ``running`` and resumes at the
next ``axpo deploy`` in the same folder).

Settings of each service come from the environment as usual (``AXPO_INFERENCE_KV_CACHE_GIB``,
...); what this command decides (addresses, folders, job-store mode) is set over them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from axpo.jobs import JobStore
from axpo.local.processes import (
    Child,
    Interrupted,
    Processes,
    Restart,
    Supervisor,
    settings_env,
)
from axpo.local.run_job import start_api
from axpo.settings.job import RestartSpec


@dataclass
class Deployment:
    """One local deployment in ``root`` serving ``model`` (a checkpoint directory)."""

    root: Path
    model: Path
    rollout_workers: int = 1
    restarts: RestartSpec = field(default_factory=RestartSpec)
    startup_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)
    """Settings for every process on top of this process's environment
    (``AXPO_INFERENCE_KV_CACHE_GIB`` ...); what the deployment decides is set over them."""
    python: str = sys.executable
    out: IO[str] = field(default_factory=lambda: sys.stderr)
    on_restart: Callable[[Restart], None] | None = None
    procs: Processes = field(init=False)
    supervisor: Supervisor = field(init=False)
    api_url: str = field(init=False, default="")
    children: dict[str, Child] = field(init=False, default_factory=dict)
    _store: JobStore | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.model = self.model.resolve()
        self.procs = Processes(self.root, python=self.python, out=self.out)
        restartable = {"api", "tools", "verifier", "inference", "learner"}
        restartable |= {f"rollout-{i}" for i in range(self.rollout_workers)}
        self.supervisor = Supervisor(
            self.procs, self.restarts, frozenset(restartable), self._restarted
        )

    def _restarted(self, event: Restart) -> None:
        """Said, and recorded in the running job's events (``restart``) when a job runs."""
        reason = event.reason()
        self.procs.say(f"{event.service} {reason} (restart {event.number})")
        if self._store is not None:
            import redis

            try:
                job = self._store.running_job()
                if job is not None:
                    self._store.record_restart(job.id, event.service, reason, event.number)
            except redis.RedisError as exc:
                self.procs.say(f"warning: the restart could not be recorded: {exc}")
        if self.on_restart is not None:
            self.on_restart(event)

    def start(self) -> str:
        """Start every process and wait until each is healthy; returns the api's URL."""
        from axpo.queue import connect
        from axpo.settings.queue import QueueSettings

        if not (self.model / "config.json").is_file():
            raise ValueError(f"model {self.model}: not a checkpoint directory (no config.json)")
        self.root.mkdir(parents=True, exist_ok=True)
        queue = QueueSettings(embedded_dir=str(self.root / "redis"))
        client, self.procs.redis = connect(queue)
        self._store = JobStore(client)
        redis_url = self.procs.redis.url

        def start(name: str, service: str, env: dict[str, str]) -> Child:
            return self.procs.start(name, service, {**self.env, **env})

        c = self.children
        # Its token: AXPO_API_TOKENS when set, else a new one in <root>/api-token (0600).
        c["api"], self.api_url, _ = start_api(
            self.procs,
            redis_url,
            self.root,
            self.startup_timeout_s,
            os.environ.get("AXPO_API_TOKENS", ""),
        )
        c["verifier"] = start("verifier", "verifier", {})
        c["tools"] = start("tools", "tools", {})
        c["inference"] = start("inference", "inference", {"AXPO_INFERENCE_MODEL": str(self.model)})
        self.procs.wait_ready([c["verifier"], c["tools"], c["inference"]], self.startup_timeout_s)

        def target(name: str, deadline_s: float) -> dict[str, Any]:
            return {"target": f"127.0.0.1:{c[name].port}", "deadline_s": deadline_s}

        queue_env = {"redis_url": redis_url}
        c["learner"] = start(
            "learner",
            "learner",
            settings_env(
                "AXPO_LEARNER_",
                {
                    "model": str(self.model),
                    "job_store": True,
                    "jobs_dir": str(self.root / "jobs"),
                    "queue": queue_env,
                    "inference_targets": [target("inference", 600.0)],
                    "publish_dir": str(self.root / "publish"),
                },
            ),
        )
        for i in range(self.rollout_workers):
            c[f"rollout-{i}"] = start(
                f"rollout-{i}",
                "rollout",
                settings_env(
                    "AXPO_ROLLOUT_",
                    {
                        "job_store": True,
                        "tokenizer": str(self.model),
                        "queue": queue_env,
                        "inference": target("inference", 600.0),
                        "tools": target("tools", 120.0),
                        "verifier": target("verifier", 120.0),
                        "consumer": f"rollout-{i}",
                    },
                ),
            )
        workers = [c[f"rollout-{i}"] for i in range(self.rollout_workers)]
        self.procs.wait_ready([c["learner"], *workers], self.startup_timeout_s)
        return self.api_url

    def watch(self, until: Callable[[], bool] = lambda: False, poll_s: float = 0.5) -> None:
        """Supervise until ``until()`` is true (never, by default: until a signal); RunError
        when a budget is spent or the inference service exits."""
        while not until():
            self.supervisor.check()
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop every process (rollout workers first; the learner checkpoints) and Redis."""
        self.procs.stop_all()


def deploy(
    model: Path,
    root: Path,
    *,
    rollout_workers: int = 1,
    restarts: RestartSpec | None = None,
    out: IO[str] | None = None,
) -> None:
    """``axpo deploy``: start, say where the api is, supervise until SIGINT/SIGTERM
    (:class:`~axpo.local.processes.Interrupted`), stop."""
    dep = Deployment(root, model, rollout_workers, restarts or RestartSpec(), out=out or sys.stderr)

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = dep.start()
        token_hint = (
            f"$(cat {dep.root / 'api-token'})"
            if (dep.root / "api-token").exists()
            else "(your AXPO_API_TOKENS)"
        )
        dep.procs.say(
            f"deployment ready: api {url}; submit with AXPO_API_URL={url} "
            f"AXPO_API_TOKEN={token_hint} axpo job submit CONFIG --watch"
        )
        dep.watch()
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            dep.procs.say("stopping the deployment ...")
            dep.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
