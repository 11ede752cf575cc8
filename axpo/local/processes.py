"""The processes of a local run: starting ``axpo serve <service>`` children, waiting for
them to be healthy, stopping them in stages; and the environment that carries their settings."""

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

from axpo.settings.base import RpcClientSettings

PR_SET_PDEATHSIG = 1


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
class Processes:
    """Starts, watches and stops the service processes of one run: each is ``axpo serve
    <service>`` with ``--port 0 --port-file``, its log in ``run_dir/logs``; children die with
    this process (``PR_SET_PDEATHSIG``) and are stopped in stages (:meth:`stop_all`)."""

    run_dir: Path
    python: str = sys.executable
    out: IO[str] = field(default_factory=lambda: sys.stderr)
    children: list[Child] = field(default_factory=list)
    redis: Any = None
    grace_s: float = 20.0

    def say(self, text: str) -> None:
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

    def stop(self, children: Sequence[Child]) -> None:
        """SIGTERM ``children`` together, then SIGKILL (their process group) whatever has not
        exited after ``grace_s`` seconds."""
        for child in children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop in {self.grace_s:.0f} s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()

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
            self.stop(stage)
        for child in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


_STOP_ORDER = {"rollout": 0, "learner": 1, "tools": 2, "verifier": 2, "inference": 3}
