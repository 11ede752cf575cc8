"""The server's side of one run, from its request sent to its end.

:func:`watch_run` feeds the child the request body, keeps its output (stopping a run that
writes too much), reads its status pipe, enforces the wall clock through its pidfd, and
notices its exit; meanwhile it takes the zygote's messages (the run's exit report, the next
request's child). A run that reports its end on the status pipe is killed (its PID
namespace's init: every process of the run dies with it) and answered at once; its zygote
reaps it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

from axpo_tools.sandbox.api import SandboxLimits
from axpo_tools.sandbox.images import collect_images
from axpo_tools.sandbox.output import OUTPUT_KILL_FACTOR, OUTPUT_KILL_MIN, Capture, drain
from axpo_tools.sandbox.spare import Spare, final_report
from axpo_tools.sandbox.zygote_link import WorkerDiedError, ZygoteLink

__all__ = ["Watched", "watch_run", "write_some"]

# After a run's child is killed or has exited: how long its exit may take to show, and
# then to be reported by its zygote (with the end of its output), before the zygote is
# presumed stuck and replaced.
_EXIT_GRACE_S = 2.0
# A run still going after this long gets the next request's child prepared alongside it.
_OVERLAP_AFTER_S = 0.003


def _log() -> Any:
    from axpo.telemetry.logs import get_logger

    return get_logger(__name__)


def write_some(fd: int, pending: list[memoryview]) -> bool:
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


@dataclass
class Watched:
    """What the server saw of a run: its output, what the sandbox reported (``None`` when
    the run never reported, e.g. its zygote died), the images it left, whether it was
    stopped for too much output, and whether it was answered before its zygote reported it
    reaped (then its pid is still in ``zygote.watched``)."""

    capture: Capture
    result: dict[str, Any] | None
    images: tuple[bytes, ...]
    output_overflow: bool
    unreaped: bool


def watch_run(
    zygote: ZygoteLink,
    spare: Spare,
    limits: SandboxLimits,
    t_go: int,
    pending: list[memoryview],
    out_r: int,
    err_r: int,
    body_w: int,
) -> Watched:
    """Watch the run of ``spare``, which got its request at ``t_go``: ``pending`` is what is
    left of its body to write on ``body_w``; ``out_r``, ``err_r`` its stdout and stderr (these
    three are closed here; the spare's own descriptors are the caller's)."""
    capture = Capture(limits.output_bytes)
    kill_at = max(OUTPUT_KILL_MIN, limits.output_bytes * OUTPUT_KILL_FACTOR)
    poller = select.poll()
    open_fds = {out_r: 1, err_r: 2}
    for fd in open_fds:
        poller.register(fd, select.POLLIN)
    poller.register(spare.pidfd, select.POLLIN)
    assert zygote.ctrl is not None
    ctrl_fd = zygote.ctrl.fileno()
    ctrl: socket.socket | None = zygote.ctrl
    poller.register(ctrl_fd, select.POLLIN)
    status_open = zygote.sandboxed  # a complete status ends the run before its exit
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
    if zygote.warm and not zygote.spares and not zygote.asked:
        overlap_at = t_go / 1e9 + _OVERLAP_AFTER_S

    def kill() -> None:
        nonlocal killed_at
        if killed_at is None:
            killed_at = time.monotonic()
            spare.kill()

    try:
        while True:
            if report is None and spare.pid in zygote.exits:
                report = zygote.exits.pop(spare.pid)
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
                    with contextlib.suppress(WorkerDiedError):
                        zygote.ask(zygote.tmp_bytes, now=True)
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
                    zygote.kill()
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
                        final = final_report(status)
                elif fd == spare.pidfd:
                    poller.unregister(fd)
                    exited_at = time.monotonic()
                elif fd == body_w:
                    if not write_some(body_w, pending):
                        poller.unregister(body_w)
                        os.close(body_w)
                        body_open = False
                elif ctrl is not None and fd == ctrl_fd:
                    try:
                        zygote.pump(0)
                    except WorkerDiedError:  # (or this worker was stopped)
                        poller.unregister(ctrl_fd)
                        ctrl = None  # its children die with it: the exit shows
    finally:
        if body_open:
            os.close(body_w)
    t_end = time.monotonic_ns()
    if overlap_at is not None:
        with contextlib.suppress(WorkerDiedError):
            zygote.ask(zygote.tmp_bytes, now=False)
    if final is not None:
        # The code is done and said so: kill its PID namespace's init now (every process
        # of the run goes with it) and answer; the zygote reaps it meanwhile.
        kill()
        for fd, stream in open_fds.items():
            drain(fd, capture, stream, kill_at)
    else:  # the run ended without a final status: read the pipe to its end
        while status_open and spare.read_status(status):
            pass
    unreaped = final is not None and report is None  # answered before reaped: still watched
    if not unreaped:
        zygote.watched.discard(spare.pid)
        zygote.exits.pop(spare.pid, None)
    for fd in open_fds:
        os.close(fd)
    result: dict[str, Any] | None = None
    if final is not None or report is not None or timed_out:
        images, skipped, bad = collect_images(spare.sbx_fd, limits)
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
        _log().error("sandbox worker %d did not report a run's exit; replaced", zygote.index)
    return Watched(capture, result, images, output_overflow, unreaped)
