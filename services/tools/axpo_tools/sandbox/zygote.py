# Zygote side: imported before pivot_root hides this package, so never import from it lazily.
"""The worker side: a zygote that forks one sandboxed child per request.

Started by the pool as ``python -I -m axpo_tools.sandbox.zygote CONFIG`` with a scrubbed
environment. It runs as root but never runs request code itself and never sees request data:
it only prepares children and reaps them. The server hands each request straight to a
prepared child (see :mod:`axpo_tools.sandbox.wire`).

Once, at start (sandboxed mode):

1. import numpy, PIL and common modules (warm mode: :mod:`.preload`), ``gc.freeze()``;
2. enter a private mount namespace (plus its own empty network, IPC and UTS namespaces) and
   build the sandbox's root on a small tmpfs (:mod:`.rootfs`): read-only bind mounts of
   ``/usr`` (``/bin``, ``/lib``... as the host's symlinks into it), the Python installation
   and the venv's site-packages (of the venv's ``bin/`` only the interpreter); a minimal
   ``/etc``; ``/dev`` with null, zero, full, random, urandom; empty ``/proc`` and
   ``/sandbox`` mount points; ``/tmp`` a link into ``/sandbox``;
3. ``pivot_root`` into it, detach the host's root, remount it read-only. From here on the
   host's files do not exist for the zygote or anything it forks;
4. what every child inherits: the environment scrubbed to exactly the sandbox's, descriptors
   0-2 on ``/dev/null``, the capability bounding set emptied, no supplementary groups,
   no_new_privs (the zygote needs none of these: it never execs).

Per request, everything is fresh; nothing of a request's is shared with another request
(the zygote's own state is the same for every child, and no request can write to it):

1. the child is prepared ahead, when the server asks: once the previous run has ended and
   been reaped, or alongside it if it is still going after 3 ms: ``unshare`` new
   mount, network, IPC, UTS, cgroup and PID namespaces; mount a fresh tmpfs
   (``size=tmp_bytes``, nosuid/nodev/noexec, owned by the uid) on ``/sandbox`` with empty
   ``out/`` and ``tmp/``; reseed ``random``; fork the child, PID 1 of the new PID namespace,
   with ``fork(2)`` itself (no Python at-fork callbacks: the zygote has one thread); ``setns``
   back to the zygote's own namespaces; hand the server the child's pidfd, request socket,
   status pipe and a descriptor of its working directory;
2. the child (:mod:`.child`), still root: mounts a fresh ``/proc``, sets its
   ``oom_score_adj`` to 1000 (the OOM killer's first choice), makes ``/proc`` read-only,
   keeps only ``/dev/null`` as stdin/stdout/stderr, its status pipe and its request socket
   (every other descriptor closed), switches to its unprivileged uid/gid (two per zygote,
   used in turn; never one a live child has), sets the parent-death signal and the seccomp
   filter, and waits;
3. the request comes from the server: stdout/stderr pipes and the body pipe. The child
   writes the input files, sets the rlimits and ``exec``s the code in ``__main__``; its last
   act is a complete status report (a JSON line) on its status pipe. The server, on seeing
   it, kills the child (the PID namespace's init: every process in it dies with it) and
   answers; or it kills the child at the wall-clock limit;
4. the zygote sees the child's exit on its pidfd, reaps it (the namespaces' teardown,
   which takes the kernel milliseconds, happens here, after the answer) and reports the
   wait status and resource usage to the server, which takes no other request on this
   worker until that report is in.

``--probe`` instead reports which isolation primitives this host lacks (:mod:`.probe`).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import select
import signal
import socket
import sys
import tempfile
import time
from typing import Any, NoReturn

# Everything the zygote and its children run is imported here, at the start: after pivot_root
# this package's source is gone (the sandbox mounts only Python and its site-packages).
from axpo_tools.sandbox import linux, wire
from axpo_tools.sandbox.child import new_stdio, scrub_environment, spare_child, text_stream
from axpo_tools.sandbox.preload import import_preloaded
from axpo_tools.sandbox.probe import probe
from axpo_tools.sandbox.rootfs import RootBuilder, staging_dir

__all__ = ["Zygote", "main"]

_SEQPACKET = socket.SOCK_SEQPACKET
REQUEST_NAMESPACES = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWNET
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWCGROUP
    | linux.CLONE_NEWPID
)
_NS_TYPES = (
    ("mnt", linux.CLONE_NEWNS),
    ("net", linux.CLONE_NEWNET),
    ("ipc", linux.CLONE_NEWIPC),
    ("uts", linux.CLONE_NEWUTS),
    ("cgroup", linux.CLONE_NEWCGROUP),
    ("pid", linux.CLONE_NEWPID),
)
_TMPFS_INODES = 16384


def _now() -> int:
    return time.monotonic_ns()


class _Child:
    """A child this zygote forked (and handed to the server) and has not reaped yet."""

    def __init__(self, pid: int, pidfd: int, uid: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.uid = uid


class Zygote:
    def __init__(self, config: dict[str, Any]) -> None:
        self.uids = [int(u) for u in config["uids"]]
        self.next_uid = 0
        self.sandboxed = bool(config["sandboxed"])
        self.preload = bool(config["preload"])
        self.one_shot = bool(config.get("one_shot"))
        self.tmp_bytes = int(config["tmp_bytes"])
        self.is_root = os.geteuid() == 0
        self.ns_fds: list[tuple[int, int]] = []
        self.seccomp = (
            linux.SeccompFilter(linux.seccomp_program()) if linux.SECCOMP_SUPPORTED else None
        )
        self.last_cap = linux.last_capability()
        # The zygote holds the write end for its whole life; a child sees POLLHUP on the read
        # end once the zygote is gone (closes the race before PR_SET_PDEATHSIG takes hold).
        self.life_r, self.life_w = os.pipe()
        os.set_blocking(self.life_r, False)
        # Live children by pidfd; at most one per uid (a running one and the next one).
        self.children: dict[int, _Child] = {}
        # Children to prepare, (tmp_bytes, now): the first one, then each the server asks
        # for. Unless ``now``, one is prepared once no other child lives (the run that asked
        # for it has ended and been reaped: preparing it alongside would slow the run down).
        self.wanted: list[tuple[int, bool]] = [(self.tmp_bytes, True)]
        self.single_threaded = False
        self.stdio: tuple[Any, Any, Any] | None = None
        self.timings: dict[str, float] = {}
        self.cgroup: str | None = config.get("cgroup")

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        t0 = _now()
        os.chdir("/")
        sys.dont_write_bytecode = True
        if self.preload:
            import_preloaded()
        t1 = _now()
        self.single_threaded = self._single_threaded()
        if self.cgroup:
            # Join the slot's memory cgroup after the imports (their pages stay charged where
            # they were): every child is then born inside, no per-request migration. The OOM
            # killer, confined to the group, picks the sandboxed code (oom_score_adj 1000).
            with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
                f.write("0")
        if self.sandboxed:
            self._enter_root()
            # Every child's environment; the workdir is always /sandbox.
            scrub_environment(wire.SANDBOX_DIR)
        if self.is_root:
            # What every child must have, set once here (children inherit it): no
            # supplementary groups, no capabilities that an exec could ever regain, and
            # no_new_privs. This process needs none of them: it never execs.
            if self.sandboxed:
                linux.drop_bounding_set(self.last_cap)
            os.setgroups([])
        linux.set_no_new_privs()
        t2 = _now()
        gc.collect()
        gc.freeze()
        self.timings = {"preload_ms": (t1 - t0) / 1e6, "root_ms": (t2 - t1) / 1e6}

    @staticmethod
    def _single_threaded() -> bool:
        """Whether this process has one thread (the imports started none), checked once
        before the host's /proc disappears: then children are forked with
        :func:`linux.fork_bare`."""
        try:
            return len(os.listdir("/proc/self/task")) == 1
        except OSError:
            return False

    def _enter_root(self) -> None:
        linux.unshare(
            linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS
        )
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        staging = staging_dir()
        RootBuilder(staging, self.uids).build()
        for name, nstype in _NS_TYPES:
            fd = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            self.ns_fds.append((fd, nstype))
        os.chdir(staging)
        linux.pivot_root(".", ".")
        linux.umount2(".", linux.MNT_DETACH)
        os.chdir("/")
        linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID)

    def shutdown(self) -> None:
        """Kill and reap every child (the server is gone or closed this zygote)."""
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        for child in self.children.values():
            os.waitpid(child.pid, 0)
            self._cleanup(child)
        self.children.clear()

    # ------------------------------------------------------------------ the loop

    def serve(self, ctrl: socket.socket) -> None:
        """Prepare the children the server asks for and hand them over; reap children as
        they end and report each; until the server closes the control socket (one-shot:
        until its one child has been reaped)."""
        poller = select.poll()
        poller.register(ctrl, select.POLLIN)
        while True:
            while (
                self.wanted
                and len(self.children) < len(self.uids)
                and (not self.children or self.wanted[0][1])
            ):
                child, fds, message = self._make_spare(self.wanted.pop(0)[0])
                self.children[child.pidfd] = child
                poller.register(child.pidfd, select.POLLIN)
                try:
                    socket.send_fds(ctrl, [message], fds)
                except OSError:
                    return  # the server is gone
                finally:
                    for fd in fds[1:]:
                        os.close(fd)
            for fd, _event in poller.poll():
                if fd == ctrl.fileno():
                    try:
                        msg = ctrl.recv(65536)
                    except OSError:
                        msg = b""
                    if not msg:
                        return  # the server is gone or closed this worker
                    want = json.loads(msg)
                    self.wanted.append((int(want["want"]), bool(want.get("now"))))
                else:
                    poller.unregister(fd)
                    self._reap(ctrl, self.children.pop(fd))
                    if self.one_shot:
                        return

    def _reap(self, ctrl: socket.socket, child: _Child) -> None:
        """The child has exited (its PID namespace, every process of its run, with it):
        reap it and tell the server how it ended."""
        _, wstatus, usage = os.wait4(child.pid, 0)
        t_reaped = _now()
        if not self.sandboxed:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)  # whatever stayed in its process group
        self._cleanup(child)
        exit_code = os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else "null"
        signal_number = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else "null"
        report = (
            f'{{"exited": {{"pid": {child.pid}, "uid": {child.uid}, "exit_code": {exit_code}, '
            f'"signal": {signal_number}, "cpu_s": {usage.ru_utime + usage.ru_stime!r}, '
            f'"maxrss_kb": {usage.ru_maxrss}, "t": {{"z_reaped": {t_reaped}}}}}}}'
        )
        with contextlib.suppress(OSError):
            ctrl.send(report.encode())

    @staticmethod
    def _cleanup(child: _Child) -> None:
        os.close(child.pidfd)

    # ------------------------------------------------------------------ the spare child

    def _make_spare(self, tmp_bytes: int) -> tuple[_Child, list[int], bytes]:
        """Fork a child for a coming request: new namespaces, fresh tmpfs and /proc,
        privileges dropped, seccomp on; it then waits for its request. Returns it, the
        descriptors for the server (pidfd, request socket, status pipe, working directory)
        and the message that goes with them.

        As much as possible happens before the fork: until then no other process shares
        this one's memory, while after it every page this process writes is first copied
        (copy-on-write) for as long as the child lives.
        """
        t_start = _now()
        # The slot's uids in turn, never one a live child has (one is taken by a run still
        # going when its successor is prepared alongside).
        busy = {child.uid for child in self.children.values()}
        while self.uids[self.next_uid] in busy:
            self.next_uid = (self.next_uid + 1) % len(self.uids)
        uid = self.uids[self.next_uid]
        self.next_uid = (self.next_uid + 1) % len(self.uids)
        go, go_child = (sock.detach() for sock in socket.socketpair(socket.AF_UNIX, _SEQPACKET))
        status_r, status_w = os.pipe()
        workdir = wire.SANDBOX_DIR
        if self.sandboxed:
            linux.unshare(REQUEST_NAMESPACES)
            linux.mount(
                "tmpfs",
                wire.SANDBOX_DIR,
                "tmpfs",
                linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                f"size={tmp_bytes},nr_inodes={_TMPFS_INODES},mode=0755,uid={uid},gid={uid}",
            )
            linux.sethostname("sandbox")
        else:
            workdir = tempfile.mkdtemp(prefix="axpo-sandbox-")
            if self.is_root:
                os.chown(workdir, uid, uid)
        sbx_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for name, mode in (("out", 0o755), ("tmp", 0o1777)):
            os.mkdir(name, mode, dir_fd=sbx_fd)
            if self.is_root:
                os.chown(name, uid, uid, dir_fd=sbx_fd)
        os.chdir(workdir)  # the child's (this process's goes back to / with its namespaces)
        # The child's own random sequence (reseeded for every child) and unused stdio
        # streams. The previous child's streams are dropped only now, when no child
        # shares the pages they are on.
        random = sys.modules.get("random")
        if random is not None:
            random.seed()
        self.stdio = new_stdio()
        head = (
            f'{{"spare": {{"uid": {uid}, "tmp_bytes": {tmp_bytes}, '
            f'"workdir": {json.dumps(workdir)}, "t": {{"z_spare": {t_start}}}, "pid": '
        )
        pid = linux.fork_bare() if self.single_threaded else os.fork()
        if pid == 0:
            spare_child(
                uid,
                workdir,
                go_child,
                status_w,
                self.stdio,
                life=(self.life_r, self.life_w),
                sandboxed=self.sandboxed,
                is_root=self.is_root,
                seccomp=self.seccomp,
            )
        if self.sandboxed:
            for fd, nstype in self.ns_fds:
                linux.setns(fd, nstype)
        else:
            os.chdir("/")
        os.close(go_child)
        os.close(status_w)
        pidfd = os.pidfd_open(pid)
        message = f"{head}{pid}}}}}".encode()
        return _Child(pid, pidfd, uid), [pidfd, go, status_r, sbx_fd], message


# --------------------------------------------------------------------------- entry point


def main(argv: list[str]) -> NoReturn:
    if argv[1:2] == ["--probe"]:
        print(json.dumps(probe()))
        sys.stdout.flush()
        os._exit(0)
    config = json.loads(argv[1])
    ctrl = socket.socket(fileno=int(config["control_fd"]))
    # Descriptors 0-2 are /dev/null here, as in every child until its request (whose stdio
    # streams are made here: new_stdio); this process's own messages go to the server's
    # stderr on a descriptor of its own.
    sys.stderr = text_stream(fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3), "w")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    zygote = Zygote(config)
    try:
        zygote.start()
    except BaseException as exc:  # noqa: BLE001 - reported to the server, then exit
        with contextlib.suppress(OSError):
            ctrl.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        os._exit(1)
    ready = {"ready": True, "pid": os.getpid(), **zygote.timings}
    with contextlib.suppress(OSError):
        ctrl.send(json.dumps(ready).encode())
    try:
        zygote.serve(ctrl)
    except BaseException as exc:  # noqa: BLE001 - namespaces may be half-switched: leave
        with contextlib.suppress(BaseException):
            print(f"axpo sandbox zygote: {type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(2)  # the children die with this process (parent-death signal)
    with contextlib.suppress(BaseException):
        zygote.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
