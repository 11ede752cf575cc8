"""How what the server saw of a run becomes its :class:`~axpo_tools.sandbox.api.RunResult`:
the error kind and message (wall clock, CPU time, memory, disk, processes, output, the
syscall filter, the sandbox itself), with per-phase timings."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from typing import Any

from axpo.contracts.domain import ToolErrorKind
from axpo_tools.sandbox.api import RunResult, SandboxLimits
from axpo_tools.sandbox.output import Capture

__all__ = ["not_started", "run_result"]

_ERROR_KINDS = {
    "memory": (ToolErrorKind.RESOURCE_LIMIT, "memory limit exceeded (memory_bytes={})"),
    "disk": (ToolErrorKind.RESOURCE_LIMIT, "disk limit exceeded (file_bytes/tmp_bytes)"),
    "files": (ToolErrorKind.RESOURCE_LIMIT, "open-file limit exceeded (open_files={})"),
    "processes": (ToolErrorKind.RESOURCE_LIMIT, "process limit exceeded (max_processes={})"),
}


def not_started(t0: int, message: str) -> RunResult:
    """An ``INTERNAL`` result: the run never started (``message`` says why)."""
    return RunResult(
        stdout="",
        stderr="",
        error_kind=ToolErrorKind.INTERNAL,
        message=message,
        latency_ms=(time.monotonic_ns() - t0) / 1e6,
    )


def run_result(
    t0: int,
    limits: SandboxLimits,
    capture: Capture,
    result: dict[str, Any] | None,
    images: tuple[bytes, ...],
    dropped: int,
    *,
    started: bool,
    server_timeout: bool,
    output_overflow: bool,
    protocol_error: bool,
    oom_killed: bool,
) -> RunResult:
    """The :class:`RunResult` of a run that started at ``t0`` (``monotonic_ns``): its output,
    images and timings, and why the sandbox stopped it, if it did. ``result`` is what the
    server saw and the sandbox reported (``None``: nothing, e.g. its zygote died);
    ``oom_killed``: the kernel OOM-killed in the slot's memory cgroup during the run."""
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
        message = f"wall-clock limit of {limits.wall_s:g}s exceeded; the process tree was killed"
    elif output_overflow:
        kind, exit_code = ToolErrorKind.RESOURCE_LIMIT, -signal.SIGKILL
        message = f"output limit exceeded (more than {capture.total} bytes); the run was stopped"
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
