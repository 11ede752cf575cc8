"""``axpo run CONFIG``: the whole system as local processes on one machine.

What it does, in order:

1. Validates the job spec and makes the run folder (``runs/<job>-<time>`` unless given):
   ``config.yaml`` (the spec as run), ``logs/<process>.log``, ``ports/``.
2. Prepares the model when the spec asks (``run.prepare_model``: build the tiny checkpoint,
   warm-start it) and the directory does not exist yet; later runs reuse it.
3. Starts a private Redis (``axpo.redis_server``, AOF in the run folder), then the verifier,
   tool and inference services, then the learner and ``run.rollout_workers`` rollout
   workers: each is ``axpo serve <service>`` with ``--port 0 --port-file`` and its settings
   in ``AXPO_<SERVICE>_*`` environment variables, the same entry points the containers use.
   It waits for each to write its port and answer gRPC health SERVING.
4. Feeds questions (``axpo.tasks.task_data``) onto the prompts stream, keeping
   ``max_prompt_backlog`` ahead of the workers, and shows live progress from the learner's
   ``metrics.jsonl`` (step, reward, accuracy, tool-call rate, all-wrong rate, ETA).
5. When the learner exits after ``steps`` steps: stops the workers and services (SIGTERM,
   then SIGKILL after a grace period), stops Redis, writes ``report.md`` with plots.

Ctrl-C (SIGINT) or SIGTERM at any point stops every process the same way and exits 130/143;
children also get SIGKILL from the kernel if the launcher itself dies (``PR_SET_PDEATHSIG``),
so no process outlives a run. A child that exits early fails the run with the tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from axpo.config import JobSpec, RpcClientSettings

PR_SET_PDEATHSIG = 1
EXIT_INTERRUPTED = 130


class RunError(RuntimeError):
    """The run cannot go on; the message says which process and why."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        # SIGKILL: a child still starting up (vLLM loading) may ignore or defer SIGTERM.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgid(0, 0)  # own process group: a terminal Ctrl-C reaches only the launcher


def settings_env(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """Environment variables that pydantic-settings reads back into ``values``: scalars as
    text, lists and mappings as JSON (``AXPO_LEARNER_QUEUE='{"redis_url": ...}'``).

    >>> settings_env("AXPO_LEARNER_", {"lr": 0.001, "queue": {"redis_url": "redis://x"}})
    {'AXPO_LEARNER_LR': '0.001', 'AXPO_LEARNER_QUEUE': '{"redis_url": "redis://x"}'}
    """
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, Mapping | list | tuple):
            out[name] = json.dumps(value)
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif value is None:
            continue
        else:
            out[name] = str(value)
    return out


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port_file: Path
    port: int | None = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


@dataclass
class Launcher:
    """Starts, watches and stops the processes of one run (see the module docstring)."""

    spec: JobSpec
    spec_path: Path
    run_dir: Path
    python: str = sys.executable
    out: IO[str] = field(default_factory=lambda: sys.stderr)
    children: list[Child] = field(default_factory=list)
    redis: Any = None
    grace_s: float = 20.0

    # ------------------------------------------------------------------ processes

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start(self, name: str, service: str, env: Mapping[str, str], *extra: str) -> Child:
        logs = self.run_dir / "logs"
        ports = self.run_dir / "ports"
        logs.mkdir(parents=True, exist_ok=True)
        ports.mkdir(parents=True, exist_ok=True)
        port_file = ports / name
        port_file.unlink(missing_ok=True)
        log_path = logs / f"{name}.log"
        cmd = [
            self.python,
            "-m",
            "axpo",
            "serve",
            service,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            *extra,
        ]
        child_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path, port_file)
        self.children.append(child)
        # Which processes (and process groups) belong to the run: for people and for tests.
        pids = {c.name: c.proc.pid for c in self.children}
        (self.run_dir / "pids.json").write_text(json.dumps(pids, indent=1) + "\n")
        return child

    def check_children(self) -> None:
        """RunError when a child has exited (while the run still needs it)."""
        for child in self.children:
            rc = child.proc.poll()
            if rc is not None:
                raise RunError(
                    f"{child.name} exited with code {rc}; last lines of {child.log_path}:\n"
                    + child.log_tail()
                )

    def wait_ready(self, children: Sequence[Child], timeout_s: float) -> None:
        """Wait for every child's port file and gRPC health SERVING."""
        from axpo.rpc.client import open_channel, wait_for_health

        deadline = time.monotonic() + timeout_s
        for child in children:
            while child.port is None:
                self.check_children()
                text = child.port_file.read_text() if child.port_file.exists() else ""
                if text.strip():
                    child.port = int(text)
                    break
                if time.monotonic() > deadline:
                    raise RunError(
                        f"{child.name} did not start within {timeout_s:.0f} s; last lines of "
                        f"{child.log_path}:\n{child.log_tail()}"
                    )
                time.sleep(0.2)
            channel = open_channel(RpcClientSettings(target=f"127.0.0.1:{child.port}"))
            try:
                wait_for_health(channel, max(1.0, deadline - time.monotonic()))
            finally:
                channel.close()

    def stop_all(self) -> None:
        """Stop every child in stages: rollout workers (they finish the questions in flight
        while the services still answer), the learner, the tool server and verifier, the
        inference service. Each stage gets SIGTERM and ``grace_s`` seconds, then SIGKILL; then
        whatever a child left in its process group (vLLM's engine processes) is killed, and
        Redis stopped. Idempotent."""
        stages: dict[int, list[Child]] = {}
        for child in self.children:
            stages.setdefault(_STOP_ORDER.get(child.name.split("-")[0], 5), []).append(child)
        for _, stage in sorted(stages.items()):
            for child in stage:
                if child.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for child in stage:
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._say(f"{child.name} did not stop in {self.grace_s:.0f} s: killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                    child.proc.wait()
        for child in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    # ------------------------------------------------------------------ the run

    def run(self, progress: bool = True) -> dict[str, Any]:
        spec = self.spec
        self.run_dir = self.run_dir.resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        )
        model = Path(spec.model)
        self._prepare_model(model)
        from axpo.config import QueueSettings
        from axpo.queue import TrajectoryQueue, connect
        from axpo.redis_server import RedisServerError

        # Absolute: redis-server resolves its dir from its own working directory.
        queue_settings = QueueSettings(embedded_dir=str((self.run_dir / "redis").resolve()))
        try:
            client, self.redis = connect(queue_settings)
        except RedisServerError as exc:
            raise RunError(str(exc)) from exc
        redis_url = self.redis.url if self.redis is not None else ""
        queue_env = {"redis_url": redis_url}
        queue = TrajectoryQueue(client, spec.name, QueueSettings(redis_url=redis_url))
        queue.ensure()
        started = time.monotonic()
        self._say(f"run folder {self.run_dir}")
        self._say("starting verifier, tools, inference ...")
        verifier = self.start("verifier", "verifier", {})
        tools = self.start("tools", "tools", settings_env("AXPO_TOOLS_", spec.run.tools))
        inference = self.start(
            "inference",
            "inference",
            {
                **settings_env("AXPO_INFERENCE_", spec.run.inference),
                "AXPO_INFERENCE_MODEL": str(model.resolve()),
                "AXPO_INFERENCE_SEED": str(spec.seed),
            },
        )
        self.wait_ready([verifier, tools, inference], spec.run.startup_timeout_s)

        def target(child: Child, deadline_s: float) -> dict[str, Any]:
            return {"target": f"127.0.0.1:{child.port}", "deadline_s": deadline_s}

        metrics_path = self.run_dir / "metrics.jsonl"
        learner_values: dict[str, Any] = {
            "model": str(model.resolve()),
            "job_spec": str(self.spec_path.resolve()),
            "queue": queue_env,
            "checkpoint_dir": str(self.run_dir / "checkpoints"),
            "publish_dir": str(self.run_dir / "publish"),
            "inference_targets": [target(inference, 600.0)],
            "metrics_path": str(metrics_path),
            "temperature": spec.rollout.temperature,
            "seed": spec.seed,
            "checkpoint_every": 1,
            **spec.run.learner,
        }
        # The learner acknowledges groups only at a checkpoint, and unacknowledged groups count
        # against the producers' backlog: the backlog must hold the groups of the steps between
        # checkpoints plus the next step, or the workers block and the learner waits forever.
        # Two steps ahead of the learner also bounds the policy lag of what is queued.
        every = int(learner_values["checkpoint_every"])
        backlog = spec.questions_per_step * (every + 2)
        learner_values["queue"] = {**queue_env, "max_backlog": backlog}
        self._say("starting learner and rollout workers ...")
        learner = self.start("learner", "learner", settings_env("AXPO_LEARNER_", learner_values))
        workers = []
        for i in range(spec.run.rollout_workers):
            values = {
                "job_spec": str(self.spec_path.resolve()),
                "tokenizer": str(model.resolve()),
                "queue": {**queue_env, "max_backlog": backlog},
                "inference": target(inference, 600.0),
                "tools": target(tools, 120.0),
                "verifier": target(verifier, 120.0),
                "consumer": f"rollout-{i}",
            }
            workers.append(
                self.start(f"rollout-{i}", "rollout", settings_env("AXPO_ROLLOUT_", values))
            )
        self.wait_ready([learner, *workers], spec.run.startup_timeout_s)
        ready_s = time.monotonic() - started
        self._say(f"all services ready in {ready_s:.0f} s; training {spec.steps} steps")
        records = self._train(queue, learner, metrics_path, progress)
        self.stop_all()
        client.close()
        summary = {
            "run_dir": str(self.run_dir),
            "steps": len(records),
            "startup_s": round(ready_s, 1),
            "wall_s": round(time.monotonic() - started, 1),
            "metrics": str(metrics_path),
        }
        summary["report"] = str(self._report())
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _prepare_model(self, model: Path) -> None:
        how = self.spec.run.prepare_model
        if model.is_dir():
            return
        if how == "none":
            raise RunError(f"model {model}: not a directory (set run.prepare_model to build one)")
        self._say(f"building the tiny model at {model} ...")
        base = model if how == "tiny" else model.with_name(model.name + "-base")
        if not base.is_dir():
            _check_call([self.python, "-m", "axpo", "model", "tiny", "--out", str(base)])
        if how == "tiny-warm-start":
            self._say(f"warm-starting it ({self.spec.run.warm_start_steps} steps) ...")
            tmp = model.with_name(model.name + ".partial")
            _check_call(
                [
                    self.python,
                    "-m",
                    "axpo",
                    "model",
                    "warm-start",
                    "--model",
                    str(base),
                    "--out",
                    str(tmp),
                    "--steps",
                    str(self.spec.run.warm_start_steps),
                    "--image-size",
                    str(self.spec.tasks.image_size),
                    "--seed",
                    str(self.spec.seed),
                ]
            )
            tmp.rename(model)  # complete or absent

    def _train(
        self, queue: Any, learner: Child, metrics_path: Path, progress: bool
    ) -> list[dict[str, Any]]:
        from axpo.queue import PromptTask
        from axpo.tasks import task_data

        spec = self.spec
        backlog = spec.run.max_prompt_backlog or 2 * spec.questions_per_step
        fed = 0
        records: list[dict[str, Any]] = []
        show = _Progress(spec, self.out, enabled=progress)
        try:
            while True:
                c = queue.counters()
                outstanding = c.prompts_produced - c.prompts_done - c.prompts_dead_lettered
                if outstanding < backlog:
                    tasks = [
                        PromptTask(
                            task_id=f"q{fed + i}",
                            question_id=f"q{(fed + i) % spec.tasks.count}",
                            data=task_data(spec.tasks, fed + i),
                        )
                        for i in range(backlog - outstanding)
                    ]
                    queue.put_prompts(tasks)
                    fed += len(tasks)
                records = self._new_records(metrics_path, records, show)
                rc = learner.proc.poll()
                if rc is not None:
                    records = self._new_records(metrics_path, records, show)
                    if rc != 0 and len(records) >= spec.steps:
                        # Every step is trained, checkpointed and recorded; a crash while the
                        # interpreter tears down must not throw the run away, but is reported.
                        self._say(
                            f"warning: the learner exited with code {rc} after its last step; "
                            f"see {learner.log_path}"
                        )
                    elif rc != 0 or len(records) < spec.steps:
                        raise RunError(
                            f"learner exited with code {rc} after {len(records)} of "
                            f"{spec.steps} steps; last lines of {learner.log_path}:\n"
                            + learner.log_tail()
                        )
                    return records
                others = [c for c in self.children if c is not learner]
                for child in others:
                    if child.proc.poll() is not None:
                        raise RunError(
                            f"{child.name} exited with code {child.proc.returncode}; last "
                            f"lines of {child.log_path}:\n{child.log_tail()}"
                        )
                time.sleep(0.5)
        finally:
            show.close()

    @staticmethod
    def _new_records(
        path: Path, seen: list[dict[str, Any]], show: _Progress
    ) -> list[dict[str, Any]]:
        """The learner's records so far (``axpo.report.load_metrics``: a torn last line is
        skipped); each new one goes to the progress display."""
        from axpo.report import load_metrics

        if not path.exists():
            return seen
        records = load_metrics(path)
        for record in records[len(seen) :]:
            show.update(record)
        return records

    def _report(self) -> Path:
        from axpo.report import write_report

        return write_report(
            self.run_dir,
            title=f"axpo run: {self.spec.name} ({self.spec.algorithm.name})",
            config_text=self.spec_path.read_text(),
        )


_STOP_ORDER = {"rollout": 0, "learner": 1, "tools": 2, "verifier": 2, "inference": 3}


def _check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RunError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


class _Progress:
    """Live progress with rich: step bar, ETA and the latest step's headline numbers."""

    def __init__(self, spec: JobSpec, out: IO[str], *, enabled: bool) -> None:
        self.spec = spec
        self.out = out
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=out),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                f"{spec.name} steps", total=spec.steps, stats="waiting for the first step"
            )

    def update(self, record: Mapping[str, Any]) -> None:
        stats = (
            f"reward {record.get('reward_mean', 0):.3f}  acc {record.get('accuracy', 0):.2f}  "
            f"tool {record.get('tool_call_rate', 0):.2f}  "
            f"all-wrong {record.get('all_wrong_tool_rate', 0):.2f}  "
            f"recov {record.get('recovery_rate', 0):.2f}  loss {record.get('loss', 0):+.4f}"
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=int(record["step"]), stats=stats)
        else:
            print(f"step {int(record['step'])}/{self.spec.steps}  {stats}", file=self.out)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def run(
    spec_path: Path,
    *,
    run_dir: Path | None = None,
    progress: bool = True,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Run the job in ``spec_path`` (see the module docstring); returns the summary.
    SIGINT/SIGTERM raise :class:`Interrupted` after every process is stopped."""
    from axpo.config import load_job_spec

    spec = load_job_spec(spec_path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir or Path("runs") / f"{spec.name}-{stamp}"
    launcher = Launcher(spec, spec_path, run_dir, out=out or sys.stderr)

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.run(progress=progress)
    except Interrupted:
        launcher._say("interrupted: stopping every process ...")
        raise
    finally:
        # Signals during the shutdown must not cut it short.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            launcher.stop_all()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
