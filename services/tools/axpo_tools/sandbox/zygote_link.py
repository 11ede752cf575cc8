"""The server's end of one zygote: its process, its control socket, and what it said there.

The pool starts the zygote (``python -I -m axpo_tools.sandbox.zygote CONFIG``, see
:mod:`.zygote`) and talks to it over a ``SOCK_SEQPACKET`` control socket (messages in
:mod:`.wire`): the zygote hands over the children it prepared for coming requests
(:class:`~axpo_tools.sandbox.spare.Spare`) and reports each child's exit once reaped; the
server asks for the next child to prepare.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import socket
import subprocess
import sys
import time
from collections import deque
from typing import Any

from axpo_tools.sandbox import wire
from axpo_tools.sandbox.spare import Spare

__all__ = ["SetupFailedError", "WorkerDiedError", "ZygoteLink"]

_READY_TIMEOUT_S = 120.0
# Prepared children dying before their request (a broken host): then a request fails.
_DEAD_SPARES_MAX = 3


def _log() -> Any:
    from axpo.telemetry.logs import get_logger

    return get_logger(__name__)


class WorkerDiedError(Exception):
    """The zygote was gone before the request started; the request may be retried."""


class SetupFailedError(Exception):
    """The prepared child died before it could take the request (the message says why)."""


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` has something to read (or is closed), waiting up to ``timeout_s``."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


class ZygoteLink:
    """One worker slot's zygote, seen from the server.

    ``spares`` are the children it prepared and handed over, not yet taken by a request;
    ``asked`` the ``tmp_bytes`` of those asked for and not yet received; ``exits`` the exit
    reports of the runs in ``watched`` (by pid). A prepared child that dies before its
    request counts in ``dead_spares`` (``setup_error`` says why, if it said).
    """

    def __init__(
        self,
        index: int,
        uids: tuple[int, int],
        sandboxed: bool,
        warm: bool,
        tmp_bytes: int,
        cgroup: str | None,
    ) -> None:
        self.index = index
        self.uids = uids
        self.sandboxed = sandboxed
        self.warm = warm
        self.tmp_bytes = tmp_bytes
        self.cgroup = cgroup
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctrl: socket.socket | None = None
        self.info: dict[str, Any] = {}
        self.spares: deque[Spare] = deque()
        self.asked: list[int] = []  # tmp_bytes of the spares asked for, not yet received
        self.exits: dict[int, dict[str, Any]] = {}  # the zygote's exit reports, by pid
        self.watched: set[int] = set()  # the runs whose exit reports are wanted
        self.dead_spares = 0
        self.setup_error: str | None = None

    def start(self) -> None:
        """Start the zygote process (it begins by preparing one child); see :meth:`wait_ready`."""
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
            "cgroup": self.cgroup,
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

    def wait_ready(self) -> None:
        """Wait for the zygote's ``ready`` (stopping it and raising if it fails to start)."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        try:
            while not self.info.get("ready"):
                if not self.pump(deadline - time.monotonic()):
                    raise RuntimeError("sandbox zygote did not start in time")
        except WorkerDiedError as exc:
            self.stop()
            raise RuntimeError("sandbox zygote exited during start") from exc
        except RuntimeError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pump(self, timeout_s: float) -> bool:
        """Take one message from the zygote, waiting up to ``timeout_s``; False if none came.
        Raises :class:`WorkerDiedError` when the zygote is gone."""
        if self.ctrl is None:
            raise WorkerDiedError
        if not _readable(self.ctrl, timeout_s):
            return False
        try:
            msg, fds, _, _ = socket.recv_fds(self.ctrl, 65536, 8)
        except OSError as exc:
            raise WorkerDiedError from exc
        if not msg and not fds:
            raise WorkerDiedError
        try:
            value = json.loads(msg)
        except ValueError:
            value = None
        if isinstance(value, dict) and "spare" in value and len(fds) == 4:
            spare = Spare(value["spare"], fds)
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
                self.spare_died(dead)
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

    def ask(self, tmp_bytes: int, now: bool) -> None:
        """Ask the zygote for another prepared child: ``now`` (as soon as one of the uids is
        free), or once its other children have ended (the run that asks is over)."""
        if self.ctrl is None:
            raise WorkerDiedError
        try:
            self.ctrl.send(json.dumps({"want": tmp_bytes, "now": now}).encode())
        except OSError as exc:
            raise WorkerDiedError from exc
        self.asked.append(tmp_bytes)

    def take_spare(self, tmp_bytes: int, deadline: float) -> Spare:
        """A prepared child with a tmpfs of ``tmp_bytes``, waiting for it until ``deadline``."""
        while True:
            for spare in self.spares:
                if spare.tmp_bytes == tmp_bytes:
                    self.spares.remove(spare)
                    return spare
            if self.setup_error is not None or self.dead_spares >= _DEAD_SPARES_MAX:
                error = self.setup_error or "prepared children keep dying"
                self.setup_error, self.dead_spares = None, 0
                raise SetupFailedError(error)
            if tmp_bytes not in self.asked:
                if self.spares and len(self.spares) + len(self.asked) >= len(self.uids):
                    # Every uid is taken by children of another size: free one.
                    other = self.spares.popleft()
                    other.kill()
                    other.close(self.sandboxed)
                self.ask(tmp_bytes, now=True)
            if not self.pump(deadline - time.monotonic()):
                raise TimeoutError

    def spare_died(self, spare: Spare) -> None:
        """A prepared child died before its request: count it, keep why (if it said), close
        it."""
        status = bytearray()
        spare.read_status(status)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.setup_error = str(json.loads(status)["setup_error"])
        self.dead_spares += 1
        spare.close(self.sandboxed)

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
