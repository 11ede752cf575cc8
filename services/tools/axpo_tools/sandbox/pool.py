"""The server side: :class:`PythonSandbox`, a pool of zygote workers.

Each worker slot owns two unprivileged uids (used in turn), so RLIMIT_NPROC of one request
never competes with another's, and "no process of this uid is left" is a per-slot check. The
uids are claimed host-wide with ``flock`` on files in ``/run/lock/axpo-sandbox`` (released when
the sandbox closes or its process dies), so sandboxes in different processes on one host never
share one. Warm slots keep a zygote with numpy and PIL imported; cold slots start a fresh
``python -I`` zygote for each request (same isolation, nothing preloaded).

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

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import queue
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import deque
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
# After a run's child is killed or has exited: how long its exit may take to show, and
# then to be reported by its zygote (with the end of its output), before the zygote is
# presumed stuck and replaced.
_EXIT_GRACE_S = 2.0
_SETUP_TIMEOUT_WARM_S = 10.0
_SETUP_TIMEOUT_COLD_S = 60.0
_READY_TIMEOUT_S = 120.0
# How long a zygote may take to reap a run it has killed before it is replaced.
_REAP_TIMEOUT_S = 5.0
# A run still going after this long gets the next request's child prepared alongside it.
_OVERLAP_AFTER_S = 0.003
# Prepared children dying before their request (a broken host): then a request fails.
_DEAD_SPARES_MAX = 3
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
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


def uid_processes(uids: Collection[int], pids: Collection[int] | None = None) -> dict[int, int]:
    """Live host processes whose real, effective or saved uid is in ``uids``: ``{pid: ppid}``
    (among ``pids``, or all).

    Reads /proc/PID/status, so a process that made itself non-dumpable is found too. Zombies
    are left out: they run nothing (a zombie orphaned by a killed zygote waits for the host's
    init to reap it).
    """
    wanted = {str(uid).encode() for uid in uids}
    found: dict[int, int] = {}
    if pids is None:
        with os.scandir("/proc") as entries:
            names = [entry.name for entry in entries if entry.name.isdigit()]
    else:
        names = [str(pid) for pid in pids]
    for name in names:
        try:
            with open(f"/proc/{name}/status", "rb") as f:
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
                    found[int(name)] = ppid
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


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` has something to read (or is closed), waiting up to ``timeout_s``."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


def _collect_images(sbx_fd: int, limits: SandboxLimits) -> tuple[tuple[bytes, ...], int, int]:
    """The PNG images in the run's out/ (name order, up to ``max_images_out``), how many more
    there were, and how many were not valid images (or not regular files).

    ``sbx_fd`` is the run's working directory, its own tmpfs. Every step is relative to a
    descriptor and refuses symbolic links; only regular files are read (a FIFO or device
    would be skipped), at most ``file_bytes`` of each.
    """
    try:
        out_fd = os.open("out", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=sbx_fd)
    except OSError:
        return (), 0, 0
    images: list[bytes] = []
    opened = skipped = bad = 0
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        names = sorted(n for n in os.listdir(out_fd) if n.lower().endswith(_IMAGE_SUFFIXES))
        for name in names:
            if opened >= limits.max_images_out:
                skipped += 1
                continue
            try:
                fd = os.open(name, flags, dir_fd=out_fd)
            except OSError:
                bad += 1
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    bad += 1
                    continue
                opened += 1
                data = _read_image(fd, limits.file_bytes)
            finally:
                os.close(fd)
            if data is None:
                bad += 1
            else:
                images.append(data)
    finally:
        os.close(out_fd)
    return tuple(images), skipped, bad


def _drain(fd: int, capture: _Capture, stream: int, limit: int) -> None:
    """Read what the pipe holds now (its writers are already killed), up to ``limit`` bytes."""
    os.set_blocking(fd, False)
    with contextlib.suppress(OSError):
        while capture.total <= limit:
            data = os.read(fd, 1 << 16)
            if not data:
                return
            capture.feed(stream, data)


@functools.lru_cache(maxsize=64)
def _header(limits: SandboxLimits) -> bytes:
    """The request header for ``limits`` (a frozen value: computed once)."""
    return json.dumps({"limits": asdict(limits)}).encode()


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


class _Spare:
    """A child the zygote forked ahead, waiting for a request: the server's handles on it."""

    __slots__ = ("go", "pid", "pidfd", "sbx_fd", "status_r", "t", "tmp_bytes", "uid", "workdir")

    def __init__(self, info: dict[str, Any], fds: list[int]) -> None:
        self.pidfd, go, self.status_r, self.sbx_fd = fds
        self.go: socket.socket | None = socket.socket(fileno=go)
        self.pid = int(info["pid"])
        self.uid = int(info["uid"])
        self.tmp_bytes = int(info["tmp_bytes"])
        self.workdir = str(info["workdir"])
        self.t: dict[str, Any] = dict(info.get("t") or {})
        os.set_blocking(self.status_r, False)

    def kill(self) -> None:
        """SIGKILL it (sandboxed, its PID namespace's init: every process of its run dies)."""
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def read_status(self, status: bytearray) -> bool:
        """Append what the status pipe holds now; False at its end (or when over the cap)."""
        try:
            chunk = os.read(self.status_r, wire.MAX_STATUS - len(status))
        except BlockingIOError:
            return True
        except OSError:
            return False
        status += chunk
        return bool(chunk) and len(status) < wire.MAX_STATUS

    def close_go(self) -> None:
        if self.go is not None:
            self.go.close()
            self.go = None

    def close(self, sandboxed: bool) -> None:
        self.close_go()
        for fd in (self.pidfd, self.status_r, self.sbx_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pidfd = self.status_r = self.sbx_fd = -1
        if not sandboxed:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _final_report(status: bytes | bytearray) -> dict[str, Any] | None:
    """The child's status once it is complete: its last act, a JSON object and a newline."""
    if not status.endswith(b"}\n"):
        return None
    with contextlib.suppress(ValueError):
        report = json.loads(status)
        if isinstance(report, dict) and type(report.get("exit")) is int:
            return report
    return None


class _SetupFailedError(Exception):
    """The prepared child died before it could take the request (the message says why)."""


class _Worker:
    """One slot: its two uids and (warm) its long-lived zygote, with the children the zygote
    has prepared for coming requests.

    The server hands a request straight to a prepared child (its request socket), reads its
    output and status, enforces the wall clock and kills it through its pidfd. The zygote
    only prepares children (when asked, at most one per uid) and reaps them, reporting each
    exit on the control socket.
    """

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
        self.spares: deque[_Spare] = deque()
        self.asked: list[int] = []  # tmp_bytes of the spares asked for, not yet received
        self.exits: dict[int, dict[str, Any]] = {}  # the zygote's exit reports, by pid
        self.watched: set[int] = set()  # the runs whose exit reports are wanted
        self.dead_spares = 0
        self.setup_error: str | None = None
        # The last run when it was answered before the zygote reported it reaped: (pid, uid).
        self.unreaped: tuple[int, int] | None = None

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
        # The zygote starts by preparing one child.
        self.asked = [self.tmp_bytes]
        self.exits = {}
        self.watched = set()
        self.setup_error = None
        self.dead_spares = 0
        self.unreaped = None
        if wait_ready:
            self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        try:
            while not self.info.get("ready"):
                if not self._pump(deadline - time.monotonic()):
                    raise RuntimeError("sandbox zygote did not start in time")
        except _WorkerDiedError as exc:
            self.stop()
            raise RuntimeError("sandbox zygote exited during start") from exc
        except RuntimeError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _pump(self, timeout_s: float) -> bool:
        """Take one message from the zygote, waiting up to ``timeout_s``; False if none came.
        Raises :class:`_WorkerDiedError` when the zygote is gone."""
        if self.ctrl is None:
            raise _WorkerDiedError
        if not _readable(self.ctrl, timeout_s):
            return False
        try:
            msg, fds, _, _ = socket.recv_fds(self.ctrl, 65536, 8)
        except OSError as exc:
            raise _WorkerDiedError from exc
        if not msg and not fds:
            raise _WorkerDiedError
        try:
            value = json.loads(msg)
        except ValueError:
            value = None
        if isinstance(value, dict) and "spare" in value and len(fds) == 4:
            spare = _Spare(value["spare"], fds)
            with contextlib.suppress(ValueError):
                self.asked.remove(spare.tmp_bytes)
            self.spares.append(spare)
        elif isinstance(value, dict) and "exited" in value and not fds:
            report = value["exited"]
            pid = int(report["pid"])
            dead = next((s for s in self.spares if s.pid == pid), None)
            if pid in self.watched:
                self.exits[pid] = report
            elif dead is not None:
                # A prepared child died before its request (a failed setup says why).
                self.spares.remove(dead)
                self.dead_spares += 1
                status = bytearray()
                dead.read_status(status)
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self.setup_error = str(json.loads(status)["setup_error"])
                dead.close(self.sandboxed)
            # (Else a child this server discarded.)
        elif isinstance(value, dict) and value.get("ready"):
            self.info = value
        elif isinstance(value, dict) and "error" in value:
            raise RuntimeError(f"sandbox zygote failed to start: {value['error']}")
        else:
            for fd in fds:
                os.close(fd)
            _log().error("sandbox worker %d: unexpected message %r", self.index, msg[:200])
        return True

    def _ask(self, tmp_bytes: int, now: bool) -> None:
        """Ask the zygote for another prepared child: ``now`` (as soon as one of the uids is
        free), or once its other children have ended (the run that asks is over)."""
        if self.ctrl is None:
            raise _WorkerDiedError
        try:
            self.ctrl.send(json.dumps({"want": tmp_bytes, "now": now}).encode())
        except OSError as exc:
            raise _WorkerDiedError from exc
        self.asked.append(tmp_bytes)

    def _take_spare(self, tmp_bytes: int, deadline: float) -> _Spare:
        """A prepared child with a tmpfs of ``tmp_bytes``, waiting for it until ``deadline``."""
        while True:
            for spare in self.spares:
                if spare.tmp_bytes == tmp_bytes:
                    self.spares.remove(spare)
                    return spare
            if self.setup_error is not None or self.dead_spares >= _DEAD_SPARES_MAX:
                error = self.setup_error or "prepared children keep dying"
                self.setup_error, self.dead_spares = None, 0
                raise _SetupFailedError(error)
            if tmp_bytes not in self.asked:
                if self.spares and len(self.spares) + len(self.asked) >= len(self.uids):
                    # Every uid is taken by children of another size: free one.
                    other = self.spares.popleft()
                    other.kill()
                    other.close(self.sandboxed)
                self._ask(tmp_bytes, now=True)
            if not self._pump(deadline - time.monotonic()):
                raise TimeoutError

    def settle(self, timeout: float = _REAP_TIMEOUT_S) -> bool:
        """Wait until the zygote has reported the last run reaped, then check that no
        process of its uid is left (else kill them and log it). True when it was clean.

        A run that reported its end is answered right after its process tree is killed,
        before the kernel has torn its namespaces down; its zygote reaps it meanwhile. A
        zygote that does not report within ``timeout`` is killed (its children die with it).
        """
        if self.unreaped is None:
            return True
        pid, uid = self.unreaped
        self.unreaped = None
        deadline = time.monotonic() + timeout
        try:
            while pid not in self.exits:
                if not self._pump(deadline - time.monotonic()):
                    _log().error("sandbox worker %d did not reap a run; replacing it", self.index)
                    self.kill()
                    break
        except _WorkerDiedError:
            pass  # its children die by their parent-death signal: check_leftovers waits
        self.exits.pop(pid, None)
        self.watched.discard(pid)
        return self.check_leftovers(uid)

    def check_leftovers(self, uid: int | None) -> bool:
        """True when no process of the run's uid is left (else kill them and say so).

        After a run is reaped its PID namespace is gone, so this is a check of an invariant.
        The zygote's own children (prepared for coming requests, possibly under the same uid)
        are not leftovers. When the zygote had to be killed (or the uid is unknown), its
        children die by their parent-death signal a moment later: wait for that (briefly)
        for both of the slot's uids.
        """
        zygote = self.proc.pid if self.alive() and self.proc is not None else None
        uids = (uid,) if uid is not None and zygote is not None else self.uids
        if zygote is not None and uid is not None and self._group_clean(uid, zygote):
            return True
        if not any(_quick_uid_pids(u) for u in uids):
            return True

        def stray() -> list[int]:
            # The quick scan cannot tell zombies (dead, waiting to be reaped) from the living.
            return [pid for pid, ppid in uid_processes(uids).items() if ppid != zygote]

        left = stray()
        if left and zygote is None:
            deadline = time.monotonic() + 2.0
            while left and time.monotonic() < deadline:
                time.sleep(0.005)
                left = stray()
        if not left:
            return True
        _log().error("sandbox processes outlived their run (uids %s): %s; killing them", uids, left)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return False

    def _group_clean(self, uid: int, zygote: int) -> bool:
        """The fast check: in this slot's memory cgroup (where the zygote and all it forks
        live; nothing inside can leave it) no process runs as ``uid`` but the zygote's own
        children. False: not known."""
        if self.cgroups is None:
            return False
        pids = self.cgroups.pids(self.index)
        if pids is None:
            return False
        others = [pid for pid in pids if pid != zygote]
        return not any(ppid != zygote for ppid in uid_processes((uid,), others).values())

    def stop(self, timeout: float = 2.0) -> None:
        while self.spares:
            self.spares.popleft().close(self.sandboxed)
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        self.info = {}
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
        self.settle()
        self.last_uid = None
        if not self.warm:
            self.spawn(wait_ready=False)
        elif not self.alive():
            raise _WorkerDiedError
        if self.cgroups is not None:
            cap = limits.memory_bytes + limits.tmp_bytes + _CGROUP_ALLOWANCE
            self.cgroups.set_limit([self.index], cap)
        try:
            return self._run(code, files, limits, t0)
        finally:
            if not self.warm:
                self.stop()  # the one-shot zygote exits once it has reaped its child
                self.unreaped = None

    def _run(
        self, code: str, files: list[tuple[str, bytes]], limits: SandboxLimits, t0: int
    ) -> RunResult:
        setup_timeout = _SETUP_TIMEOUT_WARM_S if self.warm else _SETUP_TIMEOUT_COLD_S
        deadline = time.monotonic() + setup_timeout
        header = _header(limits)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        body_r, body_w = os.pipe()
        # Most bodies fit the pipe: write them now, so the child never waits for the loop.
        os.set_blocking(body_w, False)
        pending = [memoryview(chunk) for chunk in wire.encode_body(code, files) if chunk]
        _write_some(body_w, pending)
        spare: _Spare | None = None
        failure = ""
        try:
            while spare is None:
                try:
                    spare = self._take_spare(limits.tmp_bytes, deadline)
                except _SetupFailedError as exc:
                    failure = f"sandbox setup failed: {exc}"
                    break
                except TimeoutError:
                    _log().error("sandbox worker %d prepared no child in time", self.index)
                    self.kill()
                    failure = "the sandbox worker died before the code started"
                    break
                assert spare.go is not None
                try:
                    socket.send_fds(spare.go, [header], [out_w, err_w, body_r])
                except OSError:
                    # It died before its request: why, if it said; its exit report follows.
                    status = bytearray()
                    spare.read_status(status)
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        self.setup_error = str(json.loads(status)["setup_error"])
                    self.dead_spares += 1
                    spare.close(self.sandboxed)
                    spare = None
        except BaseException:
            failure = "(raised)"
            raise
        finally:
            for fd in (out_w, err_w, body_r):
                os.close(fd)
            if failure:
                for fd in (out_r, err_r, body_w):
                    os.close(fd)
        if spare is None:
            return self._failed(t0, failure)
        t_go = time.monotonic_ns()
        spare.close_go()
        self.dead_spares = 0
        self.last_uid = spare.uid
        self.watched.add(spare.pid)
        try:
            return self._collect(t0, t_go, limits, spare, pending, out_r, err_r, body_w)
        finally:
            spare.close(self.sandboxed)

    def _failed(self, t0: int, message: str) -> RunResult:
        return RunResult(
            stdout="",
            stderr="",
            error_kind=ToolErrorKind.INTERNAL,
            message=message,
            latency_ms=(time.monotonic_ns() - t0) / 1e6,
        )

    def _collect(
        self,
        t0: int,
        t_go: int,
        limits: SandboxLimits,
        spare: _Spare,
        pending: list[memoryview],
        out_r: int,
        err_r: int,
        body_w: int,
    ) -> RunResult:
        capture = _Capture(limits.output_bytes)
        kill_at = max(_OUTPUT_KILL_MIN, limits.output_bytes * OUTPUT_KILL_FACTOR)
        poller = select.poll()
        open_fds = {out_r: 1, err_r: 2}
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        poller.register(spare.pidfd, select.POLLIN)
        assert self.ctrl is not None
        ctrl: socket.socket | None = self.ctrl
        ctrl_fd = ctrl.fileno()
        poller.register(ctrl_fd, select.POLLIN)
        status_open = self.sandboxed  # a complete status ends the run before its exit
        if status_open:
            poller.register(spare.status_r, select.POLLIN)
        body_open = bool(pending)
        if body_open:
            poller.register(body_w, select.POLLOUT)
        else:
            os.close(body_w)
        status = bytearray()
        final: dict[str, Any] | None = None
        report: dict[str, Any] | None = None
        exited_at: float | None = None
        killed_at: float | None = None
        wall_end = t_go / 1e9 + limits.wall_s
        timed_out = output_overflow = zygote_killed = False
        # The next request's child: asked for once this run is over (the zygote prepares it
        # after reaping this one), or to be prepared alongside if the run is still going
        # after _OVERLAP_AFTER_S.
        overlap_at: float | None = None
        if self.warm and not self.spares and not self.asked:
            overlap_at = t_go / 1e9 + _OVERLAP_AFTER_S

        def kill() -> None:
            nonlocal killed_at
            if killed_at is None:
                killed_at = time.monotonic()
                spare.kill()

        try:
            while True:
                if report is None and spare.pid in self.exits:
                    report = self.exits.pop(spare.pid)
                if final is not None:
                    break
                if exited_at is not None and (report is not None or ctrl is None) and not open_fds:
                    break
                now = time.monotonic()
                if exited_at is not None:
                    deadline = exited_at + _EXIT_GRACE_S
                elif killed_at is not None:
                    deadline = killed_at + _EXIT_GRACE_S
                else:
                    deadline = wall_end
                if overlap_at is not None and exited_at is None:
                    if now >= overlap_at:
                        overlap_at = None
                        with contextlib.suppress(_WorkerDiedError):
                            self._ask(self.tmp_bytes, now=True)
                    else:
                        deadline = min(deadline, overlap_at)
                if now >= deadline:
                    if exited_at is None and killed_at is None:
                        timed_out = True
                        kill()
                        continue
                    if report is None and ctrl is not None:
                        # Its zygote neither reaped nor reported it: replace the zygote.
                        zygote_killed = True
                        self.kill()
                    break  # (unsandboxed: something escaped still holds the output open)
                for fd, _event in poller.poll(max(1, int((deadline - now) * 1000) + 1)):
                    if fd in open_fds:
                        data = os.read(fd, 1 << 16)
                        if data:
                            capture.feed(open_fds[fd], data)
                            if capture.total > kill_at and not output_overflow:
                                output_overflow = True
                                kill()
                        else:
                            poller.unregister(fd)
                            os.close(fd)
                            del open_fds[fd]
                    elif fd == spare.status_r:
                        if not spare.read_status(status):
                            poller.unregister(fd)
                            status_open = False
                        elif killed_at is None:
                            final = _final_report(status)
                    elif fd == spare.pidfd:
                        poller.unregister(fd)
                        exited_at = time.monotonic()
                    elif fd == body_w:
                        if not _write_some(body_w, pending):
                            poller.unregister(body_w)
                            os.close(body_w)
                            body_open = False
                    elif ctrl is not None and fd == ctrl_fd:
                        try:
                            self._pump(0)
                        except _WorkerDiedError:  # (or this worker was stopped)
                            poller.unregister(ctrl_fd)
                            ctrl = None  # its children die with it: the exit shows
        finally:
            if body_open:
                os.close(body_w)
        t_end = time.monotonic_ns()
        if overlap_at is not None:
            with contextlib.suppress(_WorkerDiedError):
                self._ask(self.tmp_bytes, now=False)
        if final is not None:
            # The code is done and said so: kill its PID namespace's init now (every process
            # of the run goes with it) and answer; the zygote reaps it meanwhile.
            kill()
            for fd, stream in open_fds.items():
                _drain(fd, capture, stream, kill_at)
            if report is None:
                self.unreaped = (spare.pid, spare.uid)  # still watched
        else:  # the run ended without a final status: read the pipe to its end
            while status_open and spare.read_status(status):
                pass
        if self.unreaped is None or self.unreaped[0] != spare.pid:
            self.watched.discard(spare.pid)
            self.exits.pop(spare.pid, None)
        for fd in open_fds:
            os.close(fd)
        result: dict[str, Any] | None = None
        if final is not None or report is not None or timed_out:
            images, skipped, bad = _collect_images(spare.sbx_fd, limits)
            result = {
                "uid": spare.uid,
                "timed_out": timed_out,
                "status": bytes(status).decode("utf-8", "replace"),
                "images_skipped": skipped,
                "images_bad": bad,
                "t": {**spare.t, "s_go": t_go, "s_end": t_end},
            }
            if final is not None:
                result["exit_code"] = final["exit"] & 0xFF
                result["signal"] = None
                cpu, rss = final.get("cpu_s"), final.get("maxrss_kb")
                if isinstance(cpu, float) and isinstance(rss, int):
                    result["cpu_s"], result["maxrss_kb"] = cpu, rss
            elif report is not None:
                for key in ("exit_code", "signal", "cpu_s", "maxrss_kb"):
                    result[key] = report.get(key)
                result["t"].update(report.get("t") or {})
            else:
                result["exit_code"] = result["signal"] = None
        else:
            images = ()
        if zygote_killed:
            _log().error("sandbox worker %d did not report a run's exit; replaced", self.index)
        return self._result(
            t0,
            limits,
            capture,
            result,
            images,
            0,
            started=True,
            server_timeout=False,
            output_overflow=output_overflow,
            protocol_error=False,
        )

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

    def wait_reaped(self, timeout: float = _REAP_TIMEOUT_S) -> bool:
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
