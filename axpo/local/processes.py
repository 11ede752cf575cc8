"""The processes of a local run: starting ``axpo serve <service>`` children, waiting for
them to be healthy, restarting the ones that may be restarted (:class:`Supervisor`), stopping
them in stages; and the environment that carries their settings."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from axpo.settings.base import RpcClientSettings
from axpo.settings.job import RestartSpec
from axpo.telemetry.logs import get_logger, log_event

_log = get_logger(__name__)

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


def describe_exit(code: int) -> str:
    """``code 1``, or ``signal SIGKILL`` for a process a signal ended (Popen's negative codes).

    >>> describe_exit(-9), describe_exit(2)
    ('signal SIGKILL', 'code 2')
    """
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port_file: Path
    port: int | None = None
    cmd: list[str] = field(default_factory=list)
    """The command line, for a restart."""
    env: dict[str, str] = field(default_factory=dict)
    """The environment, for a restart."""
    stop_s: float | None = None
    """How long its last stop took, SIGTERM to exit, in seconds (None: never stopped)."""

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
    _previous: list[tuple[str, int]] = field(default_factory=list, init=False)

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
        child = Child(name, self._spawn(cmd, child_env, log_path), log_path, port_file)
        child.cmd, child.env = cmd, child_env
        self.children.append(child)
        self._write_pids()
        return child

    def restart(self, child: Child) -> None:
        """Start ``child``'s command again in place of its exited process, on the same port
        when it had one (the other processes keep their address for it: a tool server's
        clients reconnect by themselves), its log appended to. What the old process left in
        its process group is killed first."""
        old = child.proc
        if old.poll() is None:
            raise RuntimeError(f"{child.name} (pid {old.pid}) is still running")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(old.pid, signal.SIGKILL)
        self._previous.append((child.name, old.pid))
        cmd = list(child.cmd)
        if child.port is not None:
            cmd[cmd.index("--port") + 1] = str(child.port)
        with open(child.log_path, "ab") as log:
            log.write(f"--- axpo run: restarting {child.name} ---\n".encode())
        child.proc = self._spawn(cmd, child.env, child.log_path)
        self._write_pids()

    def _spawn(
        self, cmd: list[str], env: dict[str, str], log_path: Path
    ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )

    def _write_pids(self) -> None:
        # Which processes (and process groups) belong to the run: for people and for tests.
        # Restarted ones keep their earlier pids as "<name>~<n>" (their groups are gone too).
        pids = {c.name: c.proc.pid for c in self.children}
        seen: Counter[str] = Counter()
        for name, pid in self._previous:
            seen[name] += 1
            pids[f"{name}~{seen[name]}"] = pid
        (self.run_dir / "pids.json").write_text(json.dumps(pids, indent=1) + "\n")

    def check_children(self) -> None:
        """RunError when a child has exited (while the run still needs it)."""
        for child in self.children:
            rc = child.proc.poll()
            if rc is not None:
                raise RunError(
                    f"{child.name} exited with {describe_exit(rc)}; last lines of "
                    f"{child.log_path}:\n{child.log_tail()}"
                )

    def wait_ready(self, children: Sequence[Child], timeout_s: float) -> None:
        """Wait for every child's port file and gRPC health SERVING."""
        from axpo.rpc.client import open_channel, wait_for_health

        deadline = time.monotonic() + timeout_s
        for child in children:
            self.wait_port(child, deadline, timeout_s)
            channel = open_channel(RpcClientSettings(target=f"127.0.0.1:{child.port}"))
            try:
                wait_for_health(channel, max(1.0, deadline - time.monotonic()))
            finally:
                channel.close()

    def wait_port(self, child: Child, deadline: float, timeout_s: float) -> int:
        """Wait until ``child`` has written its port file (until the monotonic ``deadline``,
        ``timeout_s`` from the start, for the message); RunError when a child exits first."""
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
        return child.port

    def stop(self, children: Sequence[Child]) -> None:
        """SIGTERM ``children`` together, then SIGKILL (their process group) whatever has not
        exited after ``grace_s`` seconds. Records how long each running one took
        (:attr:`Child.stop_s`)."""
        running = [c for c in children if c.proc.poll() is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        deadline = started + self.grace_s
        while running and time.monotonic() < deadline:
            for child in [c for c in running if c.proc.poll() is not None]:
                child.stop_s = time.monotonic() - started
                running.remove(child)
            time.sleep(0.02)
        for child in running:
            self.say(f"{child.name} did not stop in {self.grace_s:.0f} s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
            child.stop_s = time.monotonic() - started
        for child in children:
            child.proc.wait()  # reaped (those that had exited already)

    def stop_all(self, keep: Sequence[Child] = ()) -> None:
        """Stop every child in stages: rollout workers (they finish the questions in flight
        while the services still answer), the learner, the tool server and verifier, the
        inference service, then the rest (the api). Each stage gets SIGTERM and ``grace_s``
        seconds, then SIGKILL; then whatever a child left in its process group (vLLM's engine
        processes) is killed, and Redis stopped. Children in ``keep`` are left running, and so
        is Redis (the api in ``keep`` answers from it): a later call stops them. Idempotent."""
        stopping = [c for c in self.children if not any(c is k for k in keep)]
        stages: dict[int, list[Child]] = {}
        for child in stopping:
            stages.setdefault(_STOP_ORDER.get(child.name.split("-")[0], 5), []).append(child)
        for _, stage in sorted(stages.items()):
            self.stop(stage)
        for child in stopping:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
        if self.redis is not None and not keep:
            self.redis.stop()
            self.redis = None


_STOP_ORDER = {"rollout": 0, "learner": 1, "tools": 2, "verifier": 2, "inference": 3}


@dataclass(frozen=True)
class Restart:
    """One restart decided by :class:`Supervisor` (what a job store records)."""

    service: str
    """The process's name in the run: ``rollout-0``, ``tools``, ``verifier``."""
    exit_code: int
    """How the process ended (Popen's code: negative for a signal)."""
    number: int
    """Which restart of this process it is, from 1."""
    delay_s: float
    """The wait before it is started again (the backoff)."""
    log_tail: str
    """The last lines of its log."""

    def reason(self) -> str:
        """What a job's ``restart`` event says: how it exited, and the backoff."""
        return f"exited with {describe_exit(self.exit_code)}; restarted after {self.delay_s:g} s"


@dataclass
class Supervisor:
    """Restarts the processes of a run that may be restarted, within a budget.

    Call :meth:`check` regularly (it never sleeps): a child named in ``restartable`` that
    has exited gets a restart scheduled after ``policy.delay_s(n)`` (doubling per restart of
    that process, capped), counted in :attr:`restarts`, logged, said on ``procs.out`` and
    passed to ``on_restart``; the restart itself happens on the first :meth:`check` after
    that delay. An exit beyond ``policy.max`` restarts, or the exit of a child not in
    ``restartable``, raises :class:`RunError` naming the process, how it ended and its log
    tail. Children are looked at in ``procs.children`` each time, so ones started later are
    covered."""

    procs: Processes
    policy: RestartSpec
    restartable: frozenset[str]
    on_restart: Callable[[Restart], None] | None = None
    """Called for every restart decided (the place a job store's ``record_restart`` goes)."""
    clock: Callable[[], float] = time.monotonic
    restarts: Counter[str] = field(default_factory=Counter)
    """Restarts so far per process name."""
    _due: dict[str, float] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)
    """When each process was last (re)started, as far as this supervisor saw it."""

    def check(self, skip: Sequence[Child] = ()) -> list[Restart]:
        """Restart what is due, schedule restarts for children that exited, or raise
        RunError; returns the restarts decided in this call. ``skip``: children the caller
        watches itself (the learner, whose exit ends the run)."""
        decided = []
        for child in self.procs.children:
            if any(child is s for s in skip):
                continue
            due = self._due.get(child.name)
            if due is not None:
                if self.clock() >= due:
                    del self._due[child.name]
                    self.procs.restart(child)
                    self._started[child.name] = self.clock()
                continue
            self._started.setdefault(child.name, self.clock())
            rc = child.proc.poll()
            if rc is None:
                continue
            decided.append(self._exited(child, rc))
        return decided

    def pending(self) -> list[str]:
        """Processes waiting for their restart."""
        return sorted(self._due)

    def _exited(self, child: Child, rc: int) -> Restart:
        how = describe_exit(rc)
        reset = self.policy.reset_after_s
        started = self._started.get(child.name, self.clock())
        if reset is not None and self.clock() - started >= reset:
            self.restarts[child.name] = 0  # it ran long enough: not a crash loop
        done = self.restarts[child.name]
        if child.name not in self.restartable:
            raise RunError(
                f"{child.name} exited with {how}; last lines of {child.log_path}:\n"
                + child.log_tail()
            )
        if done >= self.policy.max:
            raise RunError(
                f"{child.name} exited with {how} after {done} restart(s): the budget "
                f"(run.restarts.max {self.policy.max}) is spent; last lines of "
                f"{child.log_path}:\n{child.log_tail()}"
            )
        event = Restart(child.name, rc, done + 1, self.policy.delay_s(done + 1), child.log_tail())
        self.restarts[child.name] = event.number
        self._due[child.name] = self.clock() + event.delay_s
        self.procs.say(
            f"{child.name} exited with {how}; restarting it in {event.delay_s:g} s "
            f"(restart {event.number} of at most {self.policy.max}; log {child.log_path})"
        )
        log_event(
            _log,
            logging.WARNING,
            "restart",
            service=child.name,
            exit_code=rc,
            number=event.number,
            delay_s=event.delay_s,
        )
        if self.on_restart is not None:
            self.on_restart(event)
        return event
