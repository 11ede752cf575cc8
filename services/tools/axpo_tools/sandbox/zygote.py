"""The worker side: a zygote that forks one sandboxed child per request.

Started by the pool as ``python -I -m axpo_tools.sandbox.zygote CONFIG`` with a scrubbed
environment. It runs as root but never runs request code itself and never sees request data:
it only prepares children and reaps them. The server hands each request straight to a
prepared child (see :mod:`axpo_tools.sandbox.wire`).

Once, at start (sandboxed mode):

1. import numpy, PIL and common modules (warm mode), ``gc.freeze()``;
2. enter a private mount namespace (plus its own empty network, IPC and UTS namespaces) and
   build the sandbox's root on a small tmpfs: read-only bind mounts of ``/usr`` (``/bin``,
   ``/lib``... as the host's symlinks into it), the Python installation and the venv's
   site-packages (of the venv's ``bin/`` only the interpreter); a minimal ``/etc``; ``/dev``
   with null, zero, full, random, urandom; empty ``/proc`` and ``/sandbox`` mount points;
   ``/tmp`` a link into ``/sandbox``;
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
2. the child, still root: mounts a fresh ``/proc``, sets its ``oom_score_adj`` to 1000 (the
   OOM killer's first choice), makes ``/proc`` read-only, keeps only ``/dev/null`` as
   stdin/stdout/stderr, its status pipe and its request socket (every other descriptor
   closed), switches to its unprivileged uid/gid (two per zygote, used in turn; never one a
   live child has), sets the parent-death signal and the seccomp filter, and waits;
3. the request comes from the server: stdout/stderr pipes and the body pipe. The child
   writes the input files, sets the rlimits and ``exec``s the code in ``__main__``; its last
   act is a complete status report (a JSON line) on its status pipe. The server, on seeing
   it, kills the child (the PID namespace's init: every process in it dies with it) and
   answers; or it kills the child at the wall-clock limit;
4. the zygote sees the child's exit on its pidfd, reaps it (the namespaces' teardown,
   which takes the kernel milliseconds, happens here, after the answer) and reports the
   wait status and resource usage to the server, which takes no other request on this
   worker until that report is in.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import gc
import importlib
import json
import linecache
import os
import re
import resource
import select
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from types import CodeType, TracebackType
from typing import Any, NoReturn

from axpo_tools.sandbox import linux, wire

__all__ = ["PRELOAD", "main", "probe"]

PRELOAD = (
    "numpy",
    "PIL.Image",
    "PIL.ImageDraw",
    "PIL.ImageFont",
    "PIL.ImageFilter",
    "PIL.ImageOps",
    "PIL.ImageEnhance",
    "PIL.ImageChops",
    "PIL.ImageStat",
    "PIL.ImageColor",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "base64",
    "bisect",
    "cmath",
    "collections",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "io",
    "itertools",
    "json",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
)

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
_ROOT_TMPFS = "size=16m,nr_inodes=4096,mode=0755"
_TMPFS_INODES = 16384
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))
_SYSTEM_TOPS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_INTERPRETER_NAME = re.compile(r"python(3(\.[0-9]+)?)?")
_READ_ONLY_REBIND = (
    linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
)


def _now() -> int:
    return time.monotonic_ns()


# --------------------------------------------------------------------------- the root


class _RootBuilder:
    """Builds the sandbox's read-only root filesystem under ``root`` (a fresh tmpfs)."""

    def __init__(self, root: str, uids: list[int]) -> None:
        self.root = root.rstrip("/")
        self.uids = uids
        self.bound: list[str] = []

    def _at(self, path: str) -> str:
        return self.root + path

    def _covered(self, path: str) -> bool:
        return any(path == b or path.startswith(b.rstrip("/") + "/") for b in self.bound)

    def bind_ro(self, source: str) -> None:
        if self._covered(source) or not os.path.isdir(source):
            return
        target = self._at(source)
        os.makedirs(target, exist_ok=True)
        linux.mount(source, target, None, linux.MS_BIND)
        linux.mount(None, target, None, _READ_ONLY_REBIND)
        self.bound.append(source)

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        target = self._at(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
        os.chmod(target, mode)

    def symlink(self, path: str, to: str) -> None:
        target = self._at(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(to, target)

    def build(self) -> None:
        linux.mount("tmpfs", self.root, "tmpfs", linux.MS_NOSUID, _ROOT_TMPFS)
        os.chmod(self.root, 0o755)
        for top in _SYSTEM_TOPS:
            host = "/" + top
            if os.path.islink(host):
                self.symlink(host, os.readlink(host))
            elif os.path.isdir(host):
                self.bind_ro(host)
        self._python()
        self._etc()
        self._dev()
        for path, mode in (("/proc", 0o555), (wire.SANDBOX_DIR, 0o755), ("/var", 0o755)):
            os.makedirs(self._at(path), exist_ok=True)
            os.chmod(self._at(path), mode)
        for tmp in ("/tmp", "/var/tmp"):
            # A Python install under /tmp (a CI checkout there) keeps its read-only bind
            # mounts; /tmp is then a read-only folder and TMPDIR still points into /sandbox.
            if not os.path.lexists(self._at(tmp)):
                self.symlink(tmp, wire.SANDBOX_DIR + "/tmp")

    def _python(self) -> None:
        import site
        import sysconfig

        self.bind_ro(sys.base_prefix)
        if sys.base_exec_prefix != sys.base_prefix:
            self.bind_ro(sys.base_exec_prefix)
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            with contextlib.suppress(KeyError):
                self.bind_ro(sysconfig.get_paths()[key])
        for path in site.getsitepackages():
            self.bind_ro(path)
        if sys.prefix != sys.base_prefix and not self._covered(sys.prefix):
            # A venv: its pyvenv.cfg and interpreter links, so `python` works inside.
            cfg = os.path.join(sys.prefix, "pyvenv.cfg")
            if os.path.isfile(cfg):
                with open(cfg, "rb") as f:
                    self.write(cfg, f.read())
            for sub in ("", "bin"):
                folder = os.path.join(sys.prefix, sub)
                with contextlib.suppress(OSError), os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.is_symlink() and (sub or entry.name.startswith("lib")):
                            link = os.path.join(folder, entry.name)
                            if not os.path.lexists(self._at(link)):
                                self.symlink(link, os.readlink(link))
                        elif sub == "bin" and _INTERPRETER_NAME.fullmatch(entry.name):
                            # The interpreter itself (a copy, not a link, in this venv):
                            # bound read-only like every other host path. Other files in
                            # bin/ (entry-point scripts) stay out of the sandbox.
                            target = self._at(entry.path)
                            self.write(entry.path, b"", 0o755)
                            linux.mount(entry.path, target, None, linux.MS_BIND)
                            linux.mount(None, target, None, _READ_ONLY_REBIND)

    def _etc(self) -> None:
        users = "".join(
            f"sandbox{i}:x:{uid}:{uid}:sandbox:{wire.SANDBOX_DIR}:/bin/sh\n"
            for i, uid in enumerate(self.uids)
        )
        groups = "".join(f"sandbox{i}:x:{uid}:\n" for i, uid in enumerate(self.uids))
        self.write(
            "/etc/passwd",
            (
                "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                + users
                + "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ).encode(),
        )
        self.write("/etc/group", f"root:x:0:\n{groups}nogroup:x:65534:\n".encode())
        self.write("/etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
        self.write("/etc/hostname", b"sandbox\n")
        self.write("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files\n")
        for name in ("ld.so.cache", "mime.types"):
            with contextlib.suppress(OSError), open("/etc/" + name, "rb") as f:
                self.write("/etc/" + name, f.read())
        if os.path.exists("/usr/share/zoneinfo/Etc/UTC"):
            self.symlink("/etc/localtime", "/usr/share/zoneinfo/Etc/UTC")
        if os.path.isdir("/etc/alternatives"):
            self.bind_ro("/etc/alternatives")

    def _dev(self) -> None:
        os.makedirs(self._at("/dev"), mode=0o755, exist_ok=True)
        for name, major, minor in _DEVICES:
            node = self._at("/dev/" + name)
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(node, 0o666)
        for name, to in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("shm", wire.SANDBOX_DIR + "/tmp"),
        ):
            self.symlink("/dev/" + name, to)


def _staging_dir() -> str:
    """An existing folder to mount the root's tmpfs on. It must not hold the Python install:
    the tmpfs would hide it from the bind mounts (a checkout under /tmp did exactly that)."""
    import site

    python = [sys.prefix, sys.base_prefix, *site.getsitepackages()]
    for candidate in ("/tmp", "/mnt", "/var/tmp", "/media", "/srv", "/opt"):
        if (
            os.path.isdir(candidate)
            and not os.path.islink(candidate)
            and not any(p == candidate or p.startswith(candidate + "/") for p in python)
        ):
            return candidate
    raise OSError(errno.ENOENT, "no directory to build the sandbox root on")


# --------------------------------------------------------------------------- the zygote


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
            for name in PRELOAD:
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)
            pil_image = sys.modules.get("PIL.Image")
            if pil_image is not None:
                pil_image.init()
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
            _scrub_environment(wire.SANDBOX_DIR)
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
        staging = _staging_dir()
        _RootBuilder(staging, self.uids).build()
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
        self.stdio = _new_stdio()
        head = (
            f'{{"spare": {{"uid": {uid}, "tmp_bytes": {tmp_bytes}, '
            f'"workdir": {json.dumps(workdir)}, "t": {{"z_spare": {t_start}}}, "pid": '
        )
        pid = linux.fork_bare() if self.single_threaded else os.fork()
        if pid == 0:
            self._spare_child(uid, workdir, go_child, status_w, self.stdio)
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

    def _spare_child(
        self, uid: int, workdir: str, go_fd: int, status_w: int, stdio: tuple[Any, Any, Any]
    ) -> NoReturn:
        status_fd = status_w
        try:
            t = {"c_fork": _now()}
            linux.set_pdeathsig(signal.SIGKILL)
            os.close(self.life_w)
            with contextlib.suppress(BlockingIOError):  # (nothing to read while it lives)
                os.read(self.life_r, 1)
                os._exit(wire.EXIT_SETUP_FAILED)  # end of file: the zygote is already gone
            os.setsid()
            if self.sandboxed:
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
            if self.is_root:
                # (Bounding set, groups and no_new_privs: inherited from the zygote.)
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            linux.set_pdeathsig(signal.SIGKILL)  # cleared by the credential change
            linux.set_dumpable(True)
            if self.sandboxed and self.seccomp is not None:
                self.seccomp.install()
            if not self.sandboxed:  # sandboxed, the zygote's own is already exactly it
                _scrub_environment(workdir)
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


def _scrub_environment(workdir: str) -> None:
    os.environ.clear()
    os.environ.update(wire.child_env(workdir))


_REPLACED_STDIO: list[tuple[Any, Any, Any]] = []


def _text_stream(fd: int, mode: str) -> Any:
    """A line-buffered text stream on ``fd`` (never closes it)."""
    return open(fd, mode, encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)


def _new_stdio() -> tuple[Any, Any, Any]:
    """Unused text streams on descriptors 0, 1 and 2 (/dev/null in the zygote, as in the
    child until its request's pipes are put there)."""
    return _text_stream(0, "r"), _text_stream(1, "w"), _text_stream(2, "w")


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


# --------------------------------------------------------------------------- probe


def _probe_steps() -> Iterator[tuple[str, Any]]:
    """Each isolation step in the order the sandbox uses them, as (name, action)."""
    yield "mount namespace", lambda: linux.unshare(linux.CLONE_NEWNS)
    yield "private mounts", lambda: linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    yield "tmpfs mount", lambda: linux.mount("tmpfs", _staging_dir(), "tmpfs", 0, "size=1m")
    yield "network namespace", lambda: linux.unshare(linux.CLONE_NEWNET)
    yield "IPC namespace", lambda: linux.unshare(linux.CLONE_NEWIPC)
    yield "UTS namespace", lambda: linux.unshare(linux.CLONE_NEWUTS)
    yield "cgroup namespace", lambda: linux.unshare(linux.CLONE_NEWCGROUP)
    yield "PID namespace", lambda: linux.unshare(linux.CLONE_NEWPID)


def _probe_child(report: int) -> NoReturn:
    missing: list[str] = []
    try:
        for name, action in _probe_steps():
            try:
                action()
            except OSError as exc:
                missing.append(f"{name} ({exc.strerror})")
                raise StopIteration from exc
        pid = os.fork()
        if pid == 0:
            inner: list[str] = []
            steps: list[tuple[str, Any]] = [
                ("PID 1 in the new PID namespace", _probe_pid1),
                ("proc mount", lambda: linux.mount("proc", "/proc", "proc", linux.MS_NOSUID)),
                ("pivot_root", _probe_pivot),
                ("drop capability bounding set", lambda: linux.drop_bounding_set(0)),
                ("unprivileged uid", lambda: os.setresuid(60999, 60999, 60999)),
                ("no_new_privs", linux.set_no_new_privs),
                ("seccomp filter", lambda: linux.install_seccomp(linux.seccomp_program())),
            ]
            for name, action in steps:
                try:
                    action()
                except Exception as exc:  # noqa: BLE001 - any failure means "missing"
                    inner.append(f"{name} ({type(exc).__name__}: {exc})")
                    break
            os.write(report, json.dumps(inner).encode())
            os._exit(0)
        _, wstatus = os.waitpid(pid, 0)
        if wstatus != 0:
            missing.append(f"namespace setup (probe child status {wstatus})")
        os.close(os.pidfd_open(os.getpid()))
    except StopIteration:
        pass
    except OSError as exc:
        missing.append(f"pidfd/fork ({exc})")
    os.write(report, json.dumps(missing).encode())
    os._exit(0)


def _probe_pid1() -> None:
    if os.getpid() != 1:
        raise OSError(errno.EINVAL, f"pid is {os.getpid()}")


def _probe_pivot() -> None:
    root = _staging_dir()
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)


def probe() -> list[str]:
    """Which isolation primitives are missing on this host (empty: all there)."""
    if sys.platform != "linux":
        return [f"Linux (this is {sys.platform})"]
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (to create namespaces and switch to the sandbox uids)")
    if not linux.SECCOMP_SUPPORTED:
        missing.append("seccomp filter for this machine (x86_64 only)")
    if missing:
        return missing
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _probe_child(w)
    os.close(w)
    _, wstatus = os.waitpid(pid, 0)
    raw = b""
    while chunk := os.read(r, 65536):
        raw += chunk
    os.close(r)
    found: list[str] = []
    decoder = json.JSONDecoder()
    text = raw.decode()
    pos = 0
    while pos < len(text):
        value, pos = decoder.raw_decode(text, pos)
        found += value
    if not raw and wstatus != 0:
        found.append(f"probe process failed (status {wstatus})")
    return found


# --------------------------------------------------------------------------- entry point


def main(argv: list[str]) -> NoReturn:
    if argv[1:2] == ["--probe"]:
        print(json.dumps(probe()))
        sys.stdout.flush()
        os._exit(0)
    config = json.loads(argv[1])
    ctrl = socket.socket(fileno=int(config["control_fd"]))
    # Descriptors 0-2 are /dev/null here, as in every child until its request (whose stdio
    # streams are made here: _new_stdio); this process's own messages go to the server's
    # stderr on a descriptor of its own.
    sys.stderr = _text_stream(fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3), "w")
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
