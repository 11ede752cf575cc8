"""The server's handles on a child its zygote prepared for a coming request.

The zygote hands them over on the control socket (see :mod:`axpo_tools.sandbox.wire`): the
child's pidfd, its request socket, the read end of its status pipe and its working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
from typing import Any

from axpo_tools.sandbox import wire

__all__ = ["Spare", "final_report"]


class Spare:
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


def final_report(status: bytes | bytearray) -> dict[str, Any] | None:
    """The child's status once it is complete: its last act, a JSON object and a newline."""
    if not status.endswith(b"}\n"):
        return None
    with contextlib.suppress(ValueError):
        report = json.loads(status)
        if isinstance(report, dict) and type(report.get("exit")) is int:
            return report
    return None
