"""The server side: :class:`PythonSandbox`, a pool of zygote workers.

Each worker slot owns two unprivileged uids (used in turn), so RLIMIT_NPROC of one request
never competes with another's, and "no process of this uid is left" is a per-slot check. The
uids are claimed host-wide with ``flock`` on files in ``/run/lock/axpo-sandbox`` (released when
the sandbox closes or its process dies), so sandboxes in different processes on one host never
share one. Warm slots keep a zygote with numpy and PIL imported; cold slots start a fresh
``python -I`` zygote for each request (same isolation, nothing preloaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict
from types import MappingProxyType, TracebackType
from typing import Any

from axpo.domain import ToolErrorKind
from axpo_tools.sandbox import wire
from axpo_tools.sandbox.api import RunResult, SandboxLimits, SandboxUnavailableError
from axpo_tools.sandbox.cgroup import MemoryCgroups

__all__ = ["OUTPUT_KILL_FACTOR", "PythonSandbox", "uid_processes"]

# Output beyond output_bytes * OUTPUT_KILL_FACTOR (at least 1 MiB) stops the run.
OUTPUT_KILL_FACTOR = 64
_OUTPUT_KILL_MIN = 1 << 20
# Extra wall-clock the server allows past wall_s before it kills the child itself, and then
# before it gives up on the zygote and replaces it.
_KILL_GRACE_S = 1.0
_ZYGOTE_GRACE_S = 2.0
_SETUP_TIMEOUT_WARM_S = 10.0
_SETUP_TIMEOUT_COLD_S = 60.0
_READY_TIMEOUT_S = 120.0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_IMAGE_PIXELS = 64 << 20
_NO_FILES: Mapping[str, bytes] = MappingProxyType({})
_FILE_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

_ERROR_KINDS = {
    "memory": (ToolErrorKind.RESOURCE_LIMIT, "memory limit exceeded (memory_bytes={})"),
    "disk": (ToolErrorKind.RESOURCE_LIMIT, "disk limit exceeded (file_bytes/tmp_bytes)"),
    "files": (ToolErrorKind.RESOURCE_LIMIT, "open-file limit exceeded (open_files={})"),
    "processes": (ToolErrorKind.RESOURCE_LIMIT, "process limit exceeded (max_processes={})"),
}


# Memory a slot's cgroup allows beyond memory_bytes + tmp_bytes: the zygote's own allocations
# after it joined and the copy-on-write pages of the child prepared for the next request.
_CGROUP_ALLOWANCE = 64 << 20
_UID_START = 60000
_UID_END = 65534  # exclusive; 65534 is nobody
_UID_LOCK_DIRS = ("/run/lock/axpo-sandbox", "/tmp/axpo-sandbox-uids")


def _lock_dir() -> str:
    for path in _UID_LOCK_DIRS:
        with contextlib.suppress(OSError):
            os.makedirs(path, mode=0o755, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
    raise OSError(f"no writable directory for uid locks among {_UID_LOCK_DIRS}")


def _claim_uids(base: int | None, count: int) -> tuple[int, list[int]]:
    """Claim ``count`` consecutive uids host-wide (``base`` exactly, or the first free run
    from 60000); returns the base and the lock descriptors that hold the claim."""
    directory = _lock_dir()
    bases = [base] if base is not None else range(_UID_START, _UID_END - count + 1, count)
    for start in bases:
        fds: list[int] = []
        try:
            for uid in range(start, start + count):
                fd = os.open(os.path.join(directory, f"{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for fd in fds:
                os.close(fd)
            continue
        return start, fds
    if base is not None:
        raise ValueError(
            f"uids {base}..{base + count - 1} are in use by another PythonSandbox on this host"
            " (give each its own uid_base, or leave it to choose)"
        )
    raise ValueError("no free range of sandbox uids left")


def _log() -> Any:
    from axpo.logs import get_logger

    return get_logger(__name__)


class _WorkerDiedError(Exception):
    """The zygote was gone before the request started; the request may be retried."""


def uid_processes(uids: Collection[int]) -> dict[int, int]:
    """Live host processes whose real, effective or saved uid is in ``uids``: ``{pid: ppid}``.

    Reads /proc/PID/status, so a process that made itself non-dumpable is found too. Zombies
    are left out: they run nothing (a zombie orphaned by a killed zygote waits for the host's
    init to reap it).
    """
    wanted = {str(uid).encode() for uid in uids}
    found: dict[int, int] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/status", "rb") as f:
                    text = f.read()
            except OSError:
                continue
            ppid = -1
            for line in text.splitlines():
                if line.startswith(b"State:") and line.split()[1:2] in ([b"Z"], [b"X"]):
                    break
                if line.startswith(b"PPid:"):
                    ppid = int(line.split()[1])
                elif line.startswith(b"Uid:"):
                    if wanted & set(line.split()[1:4]):
                        found[int(entry.name)] = ppid
                    break
    return found


def _quick_uid_pids(uid: int) -> list[int]:
    """PIDs owned by ``uid`` by the owner of /proc/PID: ~5x cheaper than :func:`uid_processes`."""
    found: list[int] = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        found.append(int(entry.name))
    return found


class _Capture:
    """stdout and stderr with one shared byte budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = {1: bytearray(), 2: bytearray()}
        self.dropped = {1: 0, 2: 0}
        self.total = 0

    def feed(self, stream: int, data: bytes) -> None:
        room = self.limit - len(self.kept[1]) - len(self.kept[2])
        take = data[: max(room, 0)]
        self.kept[stream] += take
        self.dropped[stream] += len(data) - len(take)
        self.total += len(data)

    def text(self, stream: int) -> str:
        text = self.kept[stream].decode("utf-8", "replace")
        if self.dropped[stream]:
            text += f"\n[... output truncated: {self.dropped[stream]} bytes omitted]"
        return text


def _read_image(fd: int, max_bytes: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = os.pread(fd, min(1 << 20, max_bytes + 1 - size), size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    if size > max_bytes or len(data) < 24 or not data.startswith(_PNG_SIGNATURE):
        return None
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0 or width * height > _MAX_IMAGE_PIXELS:
        return None
    return data


def _parse_result(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _write_some(fd: int, pending: list[memoryview]) -> bool:
    """Write what the pipe takes now; True while some is left (False when done or broken)."""
    try:
        while pending:
            n = os.write(fd, pending[0])
            pending[0] = pending[0][n:]
            if not pending[0]:
                pending.pop(0)
    except BlockingIOError:
        return True
    except OSError:
        pending.clear()  # the child is gone; nothing more to send
    return False


class _Worker:
    """One slot: its uid, and (warm) its long-lived zygote."""

    def __init__(
        self,
        index: int,
        uids: tuple[int, int],
        sandboxed: bool,
        warm: bool,
        tmp_bytes: int,
        cgroups: MemoryCgroups | None,
    ) -> None:
        self.index = index
        self.uids = uids
        self.cgroups = cgroups
        self.tmp_bytes = tmp_bytes
        self.last_uid: int | None = None
        self.sandboxed = sandboxed
        self.warm = warm
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctrl: socket.socket | None = None
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle

    def spawn(self, wait_ready: bool) -> None:
        if not self.sandboxed:
            _log().warning(
                "PYTHON SANDBOX IS RUNNING UNSANDBOXED: rlimits only, no namespaces, "
                "no filesystem or network isolation (allow_unsandboxed=True)"
            )
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {
            "control_fd": child.fileno(),
            "uids": list(self.uids),
            "tmp_bytes": self.tmp_bytes,
            "cgroup": self.cgroups.paths[self.index] if self.cgroups else None,
            "sandboxed": self.sandboxed,
            "preload": self.warm,
            "one_shot": not self.warm,
        }
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "axpo_tools.sandbox.zygote", json.dumps(config)],
                env=dict(wire.ENV),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[child.fileno()],
                start_new_session=True,
                cwd="/",
            )
        finally:
            child.close()
        self.ctrl = parent
        if wait_ready:
            self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.ctrl is not None
        self.ctrl.settimeout(_READY_TIMEOUT_S)
        try:
            raw = self.ctrl.recv(65536)
        except OSError as exc:
            self.stop()
            raise RuntimeError(f"sandbox zygote did not start: {exc}") from exc
        finally:
            if self.ctrl is not None:
                self.ctrl.settimeout(None)
        info = json.loads(raw) if raw else {"error": "exited during start"}
        if not info.get("ready"):
            self.stop()
            raise RuntimeError(f"sandbox zygote failed to start: {info.get('error')}")
        self.info = info

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 2.0) -> None:
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    # ------------------------------------------------------------------ one request

    def run(
        self, code: str, files: list[tuple[str, bytes]], limits: SandboxLimits, t0: int
    ) -> RunResult:
        self.last_uid = None
        if not self.warm:
            self.spawn(wait_ready=False)
        elif not self.alive():
            raise _WorkerDiedError
        assert self.ctrl is not None
        if self.cgroups is not None:
            cap = limits.memory_bytes + limits.tmp_bytes + _CGROUP_ALLOWANCE
            self.cgroups.set_limit([self.index], cap)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        body_r, body_w = os.pipe()
        # Most bodies fit the pipe: write them now, so the child never waits for the loop.
        os.set_blocking(body_w, False)
        pending = [memoryview(chunk) for chunk in wire.encode_body(code, files) if chunk]
        _write_some(body_w, pending)
        res, res_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        header = json.dumps({"limits": asdict(limits)}).encode()
        try:
            socket.send_fds(self.ctrl, [header], [out_w, err_w, body_r, res_child.fileno()])
        except OSError as exc:
            for fd in (out_r, err_r, body_w):
                os.close(fd)
            res.close()
            raise _WorkerDiedError from exc
        finally:
            for fd in (out_w, err_w, body_r):
                os.close(fd)
            res_child.close()
        try:
            return self._collect(t0, limits, pending, out_r, err_r, body_w, res)
        finally:
            if not self.warm:
                self.stop()

    def _collect(
        self,
        t0: int,
        limits: SandboxLimits,
        pending: list[memoryview],
        out_r: int,
        err_r: int,
        body_w: int,
        res: socket.socket,
    ) -> RunResult:
        capture = _Capture(limits.output_bytes)
        kill_at = max(_OUTPUT_KILL_MIN, limits.output_bytes * OUTPUT_KILL_FACTOR)
        poller = select.poll()
        open_fds = {out_r: 1, err_r: 2}
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        poller.register(res, select.POLLIN)
        body_open = True
        if pending:
            poller.register(body_w, select.POLLOUT)
        else:
            os.close(body_w)
            body_open = False
        res_open = True
        pidfd: int | None = None
        received_fds: list[int] = []
        result: dict[str, Any] | None = None
        t_started = 0
        killed_at: float | None = None
        zygote_killed = False
        server_timeout = output_overflow = protocol_error = False
        setup_timeout = _SETUP_TIMEOUT_WARM_S if self.warm else _SETUP_TIMEOUT_COLD_S
        t_sent = time.monotonic()

        def kill_child() -> None:
            # Without the pidfd yet, the kill is sent the moment it arrives.
            nonlocal killed_at
            if killed_at is None:
                killed_at = time.monotonic()
            if pidfd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)

        try:
            while open_fds or res_open:
                now = time.monotonic()
                if killed_at is not None:
                    deadline = killed_at + _ZYGOTE_GRACE_S
                elif pidfd is None:
                    deadline = t_sent + setup_timeout
                else:
                    deadline = t_started / 1e9 + limits.wall_s + _KILL_GRACE_S
                if now >= deadline:
                    if killed_at is None:
                        server_timeout = pidfd is not None
                        kill_child()
                        if pidfd is None:
                            zygote_killed = True
                            self.kill()
                        continue
                    if not zygote_killed:
                        zygote_killed = True
                        self.kill()
                        killed_at = now
                        continue
                    break  # everything was killed and still no end of file: give up
                for fd, _event in poller.poll(max(1, int((deadline - now) * 1000) + 1)):
                    if fd == body_w and body_open:
                        if _write_some(body_w, pending):
                            continue
                        poller.unregister(body_w)
                        os.close(body_w)
                        body_open = False
                    elif fd in open_fds:
                        data = os.read(fd, 1 << 16)
                        if data:
                            capture.feed(open_fds[fd], data)
                            if capture.total > kill_at and not output_overflow:
                                output_overflow = True
                                kill_child()
                        else:
                            poller.unregister(fd)
                            os.close(fd)
                            del open_fds[fd]
                    else:
                        msg, fds, _, _ = socket.recv_fds(res, 1 << 20, 64)
                        if not msg and not fds:
                            poller.unregister(res)
                            res_open = False
                        elif msg == wire.PIDFD_MESSAGE and len(fds) == 1 and pidfd is None:
                            pidfd = fds[0]
                            t_started = time.monotonic_ns()
                            if killed_at is not None:
                                kill_child()
                        elif msg.startswith(b"{") and result is None:
                            received_fds.extend(fds)
                            result = _parse_result(msg)
                            if result is None:
                                protocol_error = True
                            elif isinstance(result.get("uid"), int):
                                self.last_uid = result["uid"]
                        else:
                            protocol_error = True
                            for extra in fds:
                                os.close(extra)
        finally:
            for fd in open_fds:
                os.close(fd)
            if body_open:
                os.close(body_w)
            res.close()
            if pidfd is not None:
                os.close(pidfd)
        try:
            images, dropped = self._images(received_fds, limits)
        finally:
            for fd in received_fds:
                os.close(fd)
        if zygote_killed and self.warm:
            self.kill()
        return self._result(
            t0,
            limits,
            capture,
            result,
            images,
            dropped,
            started=t_started > 0,
            server_timeout=server_timeout,
            output_overflow=output_overflow,
            protocol_error=protocol_error,
        )

    @staticmethod
    def _images(fds: list[int], limits: SandboxLimits) -> tuple[tuple[bytes, ...], int]:
        images: list[bytes] = []
        dropped = 0
        for fd in fds:
            data = _read_image(fd, limits.file_bytes)
            if data is None:
                dropped += 1
            else:
                images.append(data)
        return tuple(images), dropped

    def _result(
        self,
        t0: int,
        limits: SandboxLimits,
        capture: _Capture,
        result: dict[str, Any] | None,
        images: tuple[bytes, ...],
        dropped: int,
        *,
        started: bool,
        server_timeout: bool,
        output_overflow: bool,
        protocol_error: bool,
    ) -> RunResult:
        t_end = time.monotonic_ns()
        latency_ms = (t_end - t0) / 1e6
        notes: list[str] = []
        status: dict[str, Any] = {}
        timings: dict[str, float] = {}
        if result is not None:
            with contextlib.suppress(ValueError):
                parsed = json.loads(result.get("status") or "{}")
                if isinstance(parsed, dict):
                    status = parsed
            stamps: dict[str, Any] = dict(result.get("t") or {})
            child_stamps = status.get("t")
            if isinstance(child_stamps, dict):
                stamps.update(child_stamps)
            for name, value in stamps.items():
                if isinstance(value, int):
                    timings[name] = round((value - t0) / 1e6, 3)
            timings["total"] = round(latency_ms, 3)
            for key in ("cpu_s", "maxrss_kb"):
                if isinstance(result.get(key), int | float):
                    timings[key] = float(result[key])
        exit_code: int | None = None
        kind: ToolErrorKind | None = None
        message = ""
        sig = result.get("signal") if result else None
        oom_killed = bool(self.cgroups and result and self.cgroups.oom_killed(self.index))
        if result is None:
            kind = ToolErrorKind.TIMEOUT if server_timeout else ToolErrorKind.INTERNAL
            message = (
                f"wall-clock limit of {limits.wall_s:g}s exceeded; the sandbox worker was killed"
                if server_timeout
                else "the sandbox worker died" + ("" if started else " before the code started")
            )
        elif "setup_error" in status:
            kind = ToolErrorKind.INTERNAL
            message = f"sandbox setup failed: {status['setup_error']}"
        elif result.get("timed_out") or server_timeout:
            kind, exit_code = ToolErrorKind.TIMEOUT, -signal.SIGKILL
            message = (
                f"wall-clock limit of {limits.wall_s:g}s exceeded; the process tree was killed"
            )
        elif output_overflow:
            kind, exit_code = ToolErrorKind.RESOURCE_LIMIT, -signal.SIGKILL
            message = (
                f"output limit exceeded (more than {capture.total} bytes); the run was stopped"
            )
        elif isinstance(sig, int):
            exit_code = -sig
            cpu = float(result.get("cpu_s") or 0.0)
            cpu_limit_hit = sig == signal.SIGKILL and cpu >= max(1.0, -(-limits.cpu_s // 1)) - 0.05
            if cpu_limit_hit or sig == signal.SIGXCPU:
                kind = ToolErrorKind.TIMEOUT
                message = f"CPU time limit of {limits.cpu_s:g}s exceeded"
            elif sig == signal.SIGSYS:
                kind = ToolErrorKind.SANDBOX_VIOLATION
                message = "killed by the sandbox's system-call filter"
            elif sig in (signal.SIGKILL, signal.SIGXFSZ):
                kind = ToolErrorKind.RESOURCE_LIMIT
                message = f"killed by {signal.Signals(sig).name} (resource limit)"
                if sig == signal.SIGKILL and oom_killed:
                    message = (
                        "out of memory: the run's processes together exceeded "
                        f"memory_bytes + tmp_bytes = {limits.memory_bytes + limits.tmp_bytes}"
                    )
            else:
                message = f"terminated by {_signal_name(sig)}"
        else:
            raw_exit = result.get("exit_code")
            exit_code = raw_exit if isinstance(raw_exit, int) else None
            reported = status.get("exit")
            if isinstance(reported, int) and exit_code is not None and reported & 0xFF == exit_code:
                exit_code = reported
            error = status.get("error")
            if isinstance(error, str) and error in _ERROR_KINDS:
                kind, template = _ERROR_KINDS[error]
                value = {
                    "memory": limits.memory_bytes,
                    "files": limits.open_files,
                    "processes": limits.max_processes,
                }.get(error)
                message = template.format(value)
            summary = status.get("exc")
            if isinstance(summary, str) and summary:
                message = f"{message}: {summary}" if message else summary
            elif exit_code not in (0, None):
                message = message or f"exited with status {exit_code}"
        if protocol_error:
            notes.append("unexpected message from the sandbox worker ignored")
        if oom_killed and kind is None:
            notes.append("the kernel killed process(es) of this run for using too much memory")
        if result is not None:
            skipped = int(result.get("images_skipped") or 0)
            bad = int(result.get("images_bad") or 0) + dropped
            if skipped:
                notes.append(f"{skipped} image(s) beyond max_images_out={limits.max_images_out}")
                notes.append("not returned")
            if bad:
                notes.append(f"{bad} file(s) in out/ were not valid PNG/JPEG images")
        if notes:
            message = "; ".join([message, *notes]) if message else "; ".join(notes)
        return RunResult(
            stdout=capture.text(1),
            stderr=capture.text(2),
            images=images,
            exit_code=exit_code,
            error_kind=kind,
            message=message,
            latency_ms=latency_ms,
            timings=timings,
        )


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


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
        if uid_base is not None and (uid_base < 1000 or uid_base + 2 * workers > _UID_END):
            raise ValueError(f"uid_base must leave 2 * workers uids between 1000 and {_UID_END}")
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
        uid_base, self._uid_locks = _claim_uids(uid_base, 2 * workers)
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
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers = [
            _Worker(
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
        return tuple(uid for w in self._workers for uid in w.uids)

    def stray_processes(self) -> list[int]:
        """Host processes running as a sandbox uid that are not a zygote's waiting child.

        Each zygote keeps one child forked ahead for the next request (under the slot's other
        uid); anything else under a sandbox uid outside a running request is a leak.
        """
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
        worker: _Worker,
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
            except _WorkerDiedError:
                continue
            except (OSError, RuntimeError) as exc:
                if self._closed:
                    raise RuntimeError("PythonSandbox is closed") from exc
                _log().error("sandbox worker %d failed to start: %s", worker.index, exc)
                break
            if self.sandboxed and not self._check_leftovers(worker):
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

    @staticmethod
    def _check_leftovers(worker: _Worker) -> bool:
        """True when no process of the run's uid is left (else kill them and say so).

        After a normal end the run's PID namespace is already gone, so this is a check of an
        invariant. When the zygote had to be killed, its children die by their parent-death
        signal a moment later: wait for that (briefly) for both of the slot's uids.
        """
        uids = (worker.last_uid,) if worker.last_uid is not None else worker.uids
        if not any(_quick_uid_pids(uid) for uid in uids):
            return True
        # The quick scan cannot tell zombies (dead, waiting to be reaped) from the living.
        stray = list(uid_processes(uids))
        if stray and worker.last_uid is None:
            deadline = time.monotonic() + 2.0
            while stray and time.monotonic() < deadline:
                time.sleep(0.005)
                stray = list(uid_processes(uids))
        if not stray:
            return True
        _log().error(
            "sandbox processes outlived their run (uids %s): %s; killing them", uids, stray
        )
        for pid in stray:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return False

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
