"""The server side: :class:`PythonSandbox`, a pool of zygote workers (:mod:`.worker`).

Each worker slot owns two unprivileged uids (used in turn), so RLIMIT_NPROC of one request
never competes with another's, and "no process of this uid is left" is a per-slot check. The
uids are claimed host-wide with ``flock`` on files in ``/run/lock/axpo-sandbox`` (released when
the sandbox closes or its process dies; :mod:`.uids`), so sandboxes in different processes on
one host never share one. Warm slots keep a zygote with numpy and PIL imported; cold slots
start a fresh ``python -I`` zygote for each request (same isolation, nothing preloaded).

A request goes straight to the child its zygote prepared (see :mod:`.zygote`): the server
sends it the request, reads its output and status, enforces the wall clock through its pidfd,
and opens the images it left in ``out/``. The child's last act is a complete status report;
the server then kills its process tree (the PID namespace's init) and answers at once. The
kernel's teardown of the run's namespaces (a few milliseconds) and the zygote's reaping
happen after the answer; the worker takes no other request until its zygote has reported
the run reaped, and then checks that no process of the run's uid is left.
:meth:`PythonSandbox.wait_reaped` waits for that on every worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any

from axpo.contracts.domain import ToolErrorKind
from axpo_tools.sandbox import wire
from axpo_tools.sandbox.api import RunResult, SandboxLimits, SandboxUnavailableError
from axpo_tools.sandbox.cgroup import MemoryCgroups
from axpo_tools.sandbox.uids import UID_END, claim_uids, uid_processes
from axpo_tools.sandbox.worker import REAP_TIMEOUT_S, Worker
from axpo_tools.sandbox.zygote_link import WorkerDiedError

__all__ = ["PythonSandbox"]

_NO_FILES: Mapping[str, bytes] = MappingProxyType({})
_FILE_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _log() -> Any:
    from axpo.telemetry.logs import get_logger

    return get_logger(__name__)


class PythonSandbox:
    """Runs model-written Python in a throwaway, isolated process; see the package docs.

    ``workers`` slots run at once (more concurrent :meth:`run` calls queue). ``warm`` keeps a
    zygote per slot with numpy/PIL imported (a request costs a fork); ``warm=False`` starts a
    fresh interpreter per request. If :meth:`check_isolation` finds a primitive missing,
    construction fails with :class:`SandboxUnavailableError` unless ``allow_unsandboxed``,
    which runs with rlimits only and logs a loud warning on every start.
    """

    _isolation: list[str] | None = None
    _isolation_lock = threading.Lock()

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int = 2,
        warm: bool = True,
        allow_unsandboxed: bool = False,
        *,
        uid_base: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if uid_base is not None and (uid_base < 1000 or uid_base + 2 * workers > UID_END):
            raise ValueError(f"uid_base must leave 2 * workers uids between 1000 and {UID_END}")
        self.limits = limits or SandboxLimits()
        self.warm = warm
        missing = self.check_isolation()
        if missing and not allow_unsandboxed:
            raise SandboxUnavailableError(
                "python sandbox unavailable, missing: " + "; ".join(missing)
            )
        self.sandboxed = not missing
        if missing:
            _log().warning(
                "PYTHON SANDBOX STARTING UNSANDBOXED (allow_unsandboxed=True): missing %s",
                "; ".join(missing),
            )
        # Each uid's RLIMIT_NPROC budget and leftover check must belong to one slot only.
        uid_base, self._uid_locks = claim_uids(uid_base, 2 * workers)
        uids = set(range(uid_base, uid_base + 2 * workers))
        self._uids = uids
        self._cgroups: MemoryCgroups | None = None
        if self.sandboxed:
            self._cgroups, why_not = MemoryCgroups.create(range(workers))
            if self._cgroups is None:
                _log().warning(
                    "python sandbox: %s; a run's processes together are bounded only by "
                    "max_processes * memory_bytes",
                    why_not,
                )
        self._closed = False
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        self._workers = [
            Worker(
                i,
                (uid_base + 2 * i, uid_base + 2 * i + 1),
                self.sandboxed,
                warm,
                self.limits.tmp_bytes,
                self._cgroups,
            )
            for i in range(workers)
        ]
        try:
            for worker in self._workers:
                if warm:
                    worker.spawn(wait_ready=True)
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise

    @property
    def memory_cgroup(self) -> bool:
        """Whether each run's process tree shares one memory cgroup (else rlimits only)."""
        return self._cgroups is not None

    @property
    def worker_uids(self) -> tuple[int, ...]:
        """The unprivileged uids code runs as (two per slot, used in turn: the next request's
        child is prepared under one while the current request runs under the other)."""
        return tuple(uid for w in self._workers for uid in w.zygote.uids)

    def wait_reaped(self, timeout: float = REAP_TIMEOUT_S) -> bool:
        """Wait until every finished run's processes are reaped; True when no process of any
        of them was left over.

        :meth:`run` answers as soon as the code has reported its end and its process tree
        has been killed; the worker reaps it right after, and takes no request before. This
        waits for runs in progress to finish, then for every worker to have reaped.
        """
        if self._closed:
            return True
        taken = [self._idle.get() for _ in self._workers]
        try:
            return all([worker.settle(timeout) for worker in taken])
        finally:
            for worker in taken:
                self._idle.put(worker)

    def stray_processes(self) -> list[int]:
        """Host processes running as a sandbox uid that are not a zygote's waiting child.

        Each zygote keeps one child forked ahead for the next request (under the slot's other
        uid); anything else under a sandbox uid outside a running request is a leak. Finished
        runs are first waited for until reaped (:meth:`wait_reaped`).
        """
        self.wait_reaped()
        zygotes = {w.proc.pid for w in self._workers if w.proc is not None}
        return sorted(
            pid for pid, ppid in uid_processes(self.worker_uids).items() if ppid not in zygotes
        )

    @classmethod
    def check_isolation(cls) -> list[str]:
        """The isolation primitives missing on this host; empty when all are there.

        Probed once per process (in a fresh interpreter) and cached.
        """
        with cls._isolation_lock:
            if cls._isolation is None:
                cls._isolation = _probe_isolation()
            return list(cls._isolation)

    def run(
        self,
        code: str,
        files: Mapping[str, bytes] = _NO_FILES,
        limits: SandboxLimits | None = None,
    ) -> RunResult:
        """Run ``code`` with ``files`` in its working directory; thread-safe."""
        t0 = time.monotonic_ns()
        limits = limits or self.limits
        items = [(name, bytes(data)) for name, data in files.items()]
        for name, _ in items:
            if (
                not name
                or name in (".", "..", "out", "tmp")
                or name.startswith(".")
                or len(name) > 128
                or not set(name) <= _FILE_NAME_OK
            ):
                raise ValueError(f"bad sandbox file name {name!r}")
        size = sum(len(d) for _, d in items)
        if size + (64 << 10) > limits.tmp_bytes:
            return RunResult(
                stdout="",
                stderr="",
                error_kind=ToolErrorKind.RESOURCE_LIMIT,
                message=f"input files ({size} bytes) do not fit tmp_bytes={limits.tmp_bytes}",
            )
        if self._closed:
            raise RuntimeError("PythonSandbox is closed")
        worker = self._idle.get()
        try:
            result = self._run_on(worker, code, items, limits, t0)
        finally:
            self._idle.put(worker)
        latency_ms = (time.monotonic_ns() - t0) / 1e6
        timings = dict(result.timings)
        timings["total"] = round(latency_ms, 3)
        return dataclasses.replace(result, latency_ms=latency_ms, timings=timings)

    def _run_on(
        self,
        worker: Worker,
        code: str,
        items: list[tuple[str, bytes]],
        limits: SandboxLimits,
        t0: int,
    ) -> RunResult:
        for attempt in range(2):
            if self._closed:
                raise RuntimeError("PythonSandbox is closed")
            try:
                if attempt:
                    # The zygote was gone before the request reached it: replace it, retry.
                    worker.kill()
                    worker.spawn(wait_ready=True)
                result = worker.run(code, items, limits, t0)
            except WorkerDiedError:
                continue
            except (OSError, RuntimeError) as exc:
                if self._closed:
                    raise RuntimeError("PythonSandbox is closed") from exc
                _log().error("sandbox worker %d failed to start: %s", worker.zygote.index, exc)
                break
            # A run answered before it was reaped is checked once reaped (Worker.settle).
            if (
                self.sandboxed
                and worker.unreaped is None
                and not worker.check_leftovers(worker.last_uid)
            ):
                result = dataclasses.replace(
                    result,
                    error_kind=result.error_kind or ToolErrorKind.INTERNAL,
                    message="; ".join(
                        filter(None, [result.message, "sandbox processes outlived the run"])
                    ),
                )
            return result
        return RunResult(
            stdout="",
            stderr="",
            error_kind=ToolErrorKind.INTERNAL,
            message="the sandbox worker could not be started",
        )

    def close(self) -> None:
        """Stop every worker; no sandbox process is left behind."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for worker in self._workers:
            worker.stop()
        if self.sandboxed:
            # Children die with their zygote (parent-death signal); wait until they are gone.
            deadline = time.monotonic() + 5.0
            while uid_processes(self._uids) and time.monotonic() < deadline:
                time.sleep(0.005)
        if self._cgroups is not None:
            self._cgroups.remove()
        for fd in self._uid_locks:
            os.close(fd)
        self._uid_locks = []

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _probe_isolation() -> list[str]:
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-m", "axpo_tools.sandbox.zygote", "--probe"],
            env=dict(wire.ENV),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"isolation probe could not run ({exc})"]
    try:
        missing = json.loads(done.stdout)
    except ValueError:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return [f"isolation probe failed ({'; '.join(tail) or done.returncode})"]
    if not isinstance(missing, list):
        return ["isolation probe answered nonsense"]
    return [str(m) for m in missing]
