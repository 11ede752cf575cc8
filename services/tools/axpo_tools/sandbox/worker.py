"""One slot of the pool: :class:`Worker`, its two uids, its zygote and one request at a time.

A request goes straight to the child its zygote prepared (see :mod:`.zygote`): the worker
sends it the request (:func:`_header`, the body via :mod:`.wire`), then :func:`.watch.watch_run`
reads its output and status and enforces the wall clock, and :func:`.verdict.run_result` makes
the result. The child's last act is a complete status report; the server then kills its
process tree (the PID namespace's init) and answers at once. The kernel's teardown of the
run's namespaces (a few milliseconds) and the zygote's reaping happen after the answer; the
worker takes no other request until its zygote has reported the run reaped
(:meth:`Worker.settle`), and then checks that no process of the run's uid is left.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict
from typing import Any

from axpo_tools.sandbox import wire
from axpo_tools.sandbox.api import RunResult, SandboxLimits
from axpo_tools.sandbox.cgroup import MemoryCgroups
from axpo_tools.sandbox.spare import Spare
from axpo_tools.sandbox.uids import quick_uid_pids, uid_processes
from axpo_tools.sandbox.verdict import not_started, run_result
from axpo_tools.sandbox.watch import watch_run, write_some
from axpo_tools.sandbox.zygote_link import SetupFailedError, WorkerDiedError, ZygoteLink

__all__ = ["REAP_TIMEOUT_S", "Worker"]

_SETUP_TIMEOUT_WARM_S = 10.0
_SETUP_TIMEOUT_COLD_S = 60.0
# How long a zygote may take to reap a run it has killed before it is replaced.
REAP_TIMEOUT_S = 5.0
# Memory a slot's cgroup allows beyond memory_bytes + tmp_bytes: the zygote's own allocations
# after it joined and the copy-on-write pages of the child prepared for the next request.
_CGROUP_ALLOWANCE = 64 << 20


def _log() -> Any:
    from axpo.telemetry.logs import get_logger

    return get_logger(__name__)


@functools.lru_cache(maxsize=64)
def _header(limits: SandboxLimits) -> bytes:
    """The request header for ``limits`` (a frozen value: computed once)."""
    return json.dumps({"limits": asdict(limits)}).encode()


class Worker:
    """One slot: its two uids and (warm) its long-lived zygote, with the children the zygote
    has prepared for coming requests (:class:`~axpo_tools.sandbox.zygote_link.ZygoteLink`).

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
        self.cgroups = cgroups
        self.last_uid: int | None = None
        cgroup = cgroups.paths[index] if cgroups else None
        # The slot's index, uids, sandboxing and warmth live on its zygote link.
        self.zygote = ZygoteLink(index, uids, sandboxed, warm, tmp_bytes, cgroup)
        # The last run when it was answered before the zygote reported it reaped: (pid, uid).
        self.unreaped: tuple[int, int] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The zygote's process (``None`` when stopped)."""
        return self.zygote.proc

    def spawn(self, wait_ready: bool) -> None:
        self.zygote.start()
        self.unreaped = None
        if wait_ready:
            self.zygote.wait_ready()

    def alive(self) -> bool:
        return self.zygote.alive()

    def stop(self, timeout: float = 2.0) -> None:
        self.zygote.stop(timeout)

    def kill(self) -> None:
        self.zygote.kill()

    def settle(self, timeout: float = REAP_TIMEOUT_S) -> bool:
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
            while pid not in self.zygote.exits:
                if not self.zygote.pump(deadline - time.monotonic()):
                    _log().error(
                        "sandbox worker %d did not reap a run; replacing it", self.zygote.index
                    )
                    self.kill()
                    break
        except WorkerDiedError:
            pass  # its children die by their parent-death signal: check_leftovers waits
        self.zygote.exits.pop(pid, None)
        self.zygote.watched.discard(pid)
        return self.check_leftovers(uid)

    def check_leftovers(self, uid: int | None) -> bool:
        """True when no process of the run's uid is left (else kill them and say so).

        After a run is reaped its PID namespace is gone, so this is a check of an invariant.
        The zygote's own children (prepared for coming requests, possibly under the same uid)
        are not leftovers. When the zygote had to be killed (or the uid is unknown), its
        children die by their parent-death signal a moment later: wait for that (briefly)
        for both of the slot's uids.
        """
        proc = self.zygote.proc
        zygote = proc.pid if self.alive() and proc is not None else None
        uids = (uid,) if uid is not None and zygote is not None else self.zygote.uids
        if zygote is not None and uid is not None and self._group_clean(uid, zygote):
            return True
        if not any(quick_uid_pids(u) for u in uids):
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
        pids = self.cgroups.pids(self.zygote.index)
        if pids is None:
            return False
        others = [pid for pid in pids if pid != zygote]
        return not any(ppid != zygote for ppid in uid_processes((uid,), others).values())

    # ------------------------------------------------------------------ one request

    def run(
        self, code: str, files: list[tuple[str, bytes]], limits: SandboxLimits, t0: int
    ) -> RunResult:
        self.settle()
        self.last_uid = None
        if not self.zygote.warm:
            self.spawn(wait_ready=False)
        elif not self.alive():
            raise WorkerDiedError
        if self.cgroups is not None:
            cap = limits.memory_bytes + limits.tmp_bytes + _CGROUP_ALLOWANCE
            self.cgroups.set_limit([self.zygote.index], cap)
        try:
            return self._run(code, files, limits, t0)
        finally:
            if not self.zygote.warm:
                self.stop()  # the one-shot zygote exits once it has reaped its child
                self.unreaped = None

    def _run(
        self, code: str, files: list[tuple[str, bytes]], limits: SandboxLimits, t0: int
    ) -> RunResult:
        setup_timeout = _SETUP_TIMEOUT_WARM_S if self.zygote.warm else _SETUP_TIMEOUT_COLD_S
        deadline = time.monotonic() + setup_timeout
        header = _header(limits)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        body_r, body_w = os.pipe()
        # Most bodies fit the pipe: write them now, so the child never waits for the loop.
        os.set_blocking(body_w, False)
        pending = [memoryview(chunk) for chunk in wire.encode_body(code, files) if chunk]
        write_some(body_w, pending)
        spare: Spare | None = None
        failure = ""
        try:
            while spare is None:
                try:
                    spare = self.zygote.take_spare(limits.tmp_bytes, deadline)
                except SetupFailedError as exc:
                    failure = f"sandbox setup failed: {exc}"
                    break
                except TimeoutError:
                    _log().error("sandbox worker %d prepared no child in time", self.zygote.index)
                    self.kill()
                    failure = "the sandbox worker died before the code started"
                    break
                assert spare.go is not None
                try:
                    socket.send_fds(spare.go, [header], [out_w, err_w, body_r])
                except OSError:
                    # It died before its request: why, if it said; its exit report follows.
                    self.zygote.spare_died(spare)
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
            return not_started(t0, failure)
        t_go = time.monotonic_ns()
        spare.close_go()
        self.zygote.dead_spares = 0
        self.last_uid = spare.uid
        self.zygote.watched.add(spare.pid)
        try:
            seen = watch_run(self.zygote, spare, limits, t_go, pending, out_r, err_r, body_w)
            if seen.unreaped:
                self.unreaped = (spare.pid, spare.uid)  # still watched
            oom_killed = bool(
                self.cgroups and seen.result and self.cgroups.oom_killed(self.zygote.index)
            )
            return run_result(
                t0,
                limits,
                seen.capture,
                seen.result,
                seen.images,
                0,
                started=True,
                server_timeout=False,
                output_overflow=seen.output_overflow,
                protocol_error=False,
                oom_killed=oom_killed,
            )
        finally:
            spare.close(self.zygote.sandboxed)
