# Zygote side: imported before pivot_root hides this package, so never import from it lazily.
"""The sandboxed child: what a process forked by the zygote does, from the fork to its exit.

:func:`spare_child` makes it ready (fresh ``/proc``, only its status pipe and request socket
open, its unprivileged uid, parent-death signal, seccomp) and has it wait for its request;
then it reads the request body (its files written into the working directory), sets the
rlimits and runs the code as ``__main__``; its last act is the status report (see
:mod:`axpo_tools.sandbox.wire`). Also here: the environment and stdio streams every child
gets.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import linecache
import os
import resource
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from types import CodeType, TracebackType
from typing import Any, NoReturn

from axpo_tools.sandbox import linux, wire

__all__ = ["new_stdio", "scrub_environment", "spare_child", "text_stream"]


def _now() -> int:
    return time.monotonic_ns()


def spare_child(
    uid: int,
    workdir: str,
    go_fd: int,
    status_w: int,
    stdio: tuple[Any, Any, Any],
    *,
    life: tuple[int, int],
    sandboxed: bool,
    is_root: bool,
    seccomp: linux.SeccompFilter | None,
) -> NoReturn:
    """The child's life after the zygote forked it for a coming request (it never returns):
    fresh ``/proc``, privileges dropped, seccomp on; then wait for the request on ``go_fd``,
    write its files into ``workdir``, set the rlimits and run its code. ``life`` is the
    zygote's life pipe (read end, write end): end of file means the zygote is gone."""
    life_r, life_w = life
    status_fd = status_w
    try:
        t = {"c_fork": _now()}
        linux.set_pdeathsig(signal.SIGKILL)
        os.close(life_w)
        with contextlib.suppress(BlockingIOError):  # (nothing to read while it lives)
            os.read(life_r, 1)
            os._exit(wire.EXIT_SETUP_FAILED)  # end of file: the zygote is already gone
        os.setsid()
        if sandboxed:
            flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
            linux.mount("proc", "/proc", "proc", flags)
            # The OOM killer's first choice, then /proc read-only.
            oom = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(oom, b"1000")
            finally:
                os.close(oom)
            remount = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
            linux.mount(None, "/proc", None, remount | flags)
        # fds: 0-2 /dev/null (the zygote's; 1 and 2 until the request), 3 status, 4 the
        # go socket; nothing else (setup errors go to the status pipe).
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (status_w, go_fd)]
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)
        status_fd = 3
        os.closerange(5, 1 << 20)
        if is_root:
            # (Bounding set, groups and no_new_privs: inherited from the zygote.)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        linux.set_pdeathsig(signal.SIGKILL)  # cleared by the credential change
        linux.set_dumpable(True)
        if sandboxed and seccomp is not None:
            seccomp.install()
        if not sandboxed:  # sandboxed, the zygote's own is already exactly it
            scrub_environment(workdir)
        _use_stdio(stdio)
        t["c_ready"] = _now()
        go = socket.socket(fileno=4)
        msg, fds, _, _ = socket.recv_fds(go, 65536, 4)
        t["c_go"] = _now()
        if not msg or len(fds) != 3:
            os._exit(0)  # the zygote is gone or discarded this spare
        go.close()
        limits: dict[str, Any] = json.loads(msg)["limits"]
        out_w, err_w, body_r = fds
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        code = _read_body(body_r, workdir)
        t["c_body"] = _now()
        _set_rlimits(limits)
        t["c_rlimits"] = _now()
    except BaseException as exc:  # noqa: BLE001 - reported as a setup error, then exit
        with contextlib.suppress(BaseException):
            msg_out = json.dumps({"setup_error": f"{type(exc).__name__}: {exc}"})
            os.write(status_fd, msg_out.encode())
        os._exit(wire.EXIT_SETUP_FAILED)
    _run(code, t)


# --------------------------------------------------------------------------- child helpers


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("request body ended early")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_body(body_r: int, workdir: str) -> str:
    """Read the request body; write its files into ``workdir`` (runs as the sandbox uid)."""
    (meta_len,) = struct.unpack("=I", _read_exact(body_r, 4))
    if meta_len > wire.MAX_META:
        raise ValueError("request meta too large")
    code_len, files = wire.decode_body_meta(_read_exact(body_r, meta_len))
    code = _read_exact(body_r, code_len).decode("utf-8", "surrogatepass")
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, size in files:
            if "/" in name or name in ("", ".", "..", "out", "tmp"):
                raise ValueError(f"bad file name {name!r}")
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                0o644,
                dir_fd=dir_fd,
            )
            try:
                left = size
                while left > 0:
                    chunk = os.read(body_r, min(left, 1 << 20))
                    if not chunk:
                        raise EOFError("request body ended early")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    left -= len(chunk)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    os.close(body_r)
    return code


def _set_rlimits(limits: dict[str, Any]) -> None:
    cpu = max(1, int(-(-float(limits["cpu_s"]) // 1)))

    def both(value: int) -> tuple[int, int]:
        return (value, value)

    # Soft == hard for CPU: the kernel then sends SIGKILL at the limit, which (unlike
    # SIGXCPU) also reaches PID 1 of a namespace.
    resource.setrlimit(resource.RLIMIT_CPU, both(cpu))
    resource.setrlimit(resource.RLIMIT_AS, both(int(limits["memory_bytes"])))
    resource.setrlimit(resource.RLIMIT_FSIZE, both(int(limits["file_bytes"])))
    resource.setrlimit(resource.RLIMIT_NPROC, both(int(limits["max_processes"])))
    resource.setrlimit(resource.RLIMIT_NOFILE, both(int(limits["open_files"])))
    resource.setrlimit(resource.RLIMIT_CORE, both(0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, both(0))
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, both(0))


def scrub_environment(workdir: str) -> None:
    os.environ.clear()
    os.environ.update(wire.child_env(workdir))


_REPLACED_STDIO: list[tuple[Any, Any, Any]] = []


def text_stream(fd: int, mode: str) -> Any:
    """A line-buffered text stream on ``fd`` (never closes it)."""
    return open(fd, mode, encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)


def new_stdio() -> tuple[Any, Any, Any]:
    """Unused text streams on descriptors 0, 1 and 2 (/dev/null in the zygote, as in the
    child until its request's pipes are put there)."""
    return text_stream(0, "r"), text_stream(1, "w"), text_stream(2, "w")


def _use_stdio(stdio: tuple[Any, Any, Any]) -> None:
    # The zygote's own streams stay referenced: tearing them down would only cost time.
    _REPLACED_STDIO.append((sys.stdin, sys.stdout, sys.stderr))
    sys.stdin, sys.stdout, sys.stderr = stdio
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = stdio  # type: ignore[misc]
    sys.argv = [""]


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    with contextlib.suppress(Exception):
        print(value, file=sys.stderr)
    return 1


def _classify(exc: BaseException) -> str | None:
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
            return "disk"
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "files"
        if exc.errno == errno.EAGAIN:
            return "processes"
    return None


def _print_exception(exc: BaseException, runner: CodeType) -> None:
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code is runner:
        tb = tb.tb_next
    with contextlib.suppress(BaseException):
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _convert_jpegs() -> None:
    """Re-encode out/*.jpg|*.jpeg as PNG in place (runs unprivileged, after the code)."""
    try:
        names = sorted(os.listdir("out"))
    except OSError:
        return
    for name in names:
        if not name.lower().endswith((".jpg", ".jpeg")):
            continue
        path = os.path.join("out", name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                converted = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            converted.save(path, format="PNG", compress_level=1)
        except Exception:  # noqa: BLE001 - a broken file is simply not returned
            continue


def _run(code: str, t: dict[str, int]) -> NoReturn:
    """Run ``code`` as ``__main__`` in this process; never returns."""
    me = os.getpid()
    exit_code = 0
    kind: str | None = None
    summary = ""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    linecache.cache["<tool>"] = (len(code), None, code.splitlines(True), "<tool>")
    t["c_code"] = _now()
    try:
        exec(compile(code, "<tool>", "exec"), namespace)
    except SystemExit as exc:
        exit_code = _exit_code(exc.code)
    except BaseException as exc:  # noqa: BLE001 - the code's error is its result
        exit_code = 1
        kind = _classify(exc)
        detail = str(exc)
        summary = (f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)[:300]
        _print_exception(exc, _run.__code__)
    t["c_done"] = _now()
    _flush()
    if os.getpid() != me:  # a process the code forked fell out of the code: just leave
        os._exit(exit_code & 0xFF)
    _convert_jpegs()
    t["c_exit"] = _now()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    status = {
        "exit": exit_code,
        "error": kind,
        "exc": summary,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
        "t": t,
    }
    # The last act: once this complete report is in, the zygote kills and reaps the run.
    with contextlib.suppress(BaseException):
        os.write(3, (json.dumps(status) + "\n").encode()[: wire.MAX_STATUS - 1])
    os._exit(exit_code & 0xFF)
