"""The worker side: a zygote that forks one sandboxed child per request.

Started by the pool as ``python -I -m axpo_tools.sandbox.zygote CONFIG`` with a scrubbed
environment. It runs as root but never runs request code itself and never reads request
data (code and files go straight from the server to the child through a pipe).

Once, at start (sandboxed mode):

1. import numpy, PIL and common modules (warm mode), ``gc.freeze()``;
2. enter a private mount namespace (plus its own empty network, IPC and UTS namespaces) and
   build the sandbox's root on a small tmpfs: read-only bind mounts of ``/usr`` (``/bin``,
   ``/lib``... as the host's symlinks into it), the Python installation and the venv's
   site-packages; a minimal ``/etc``; ``/dev`` with null, zero, full, random, urandom;
   empty ``/proc`` and ``/sandbox`` mount points; ``/tmp`` a link into ``/sandbox``;
3. ``pivot_root`` into it, detach the host's root, remount it read-only. From here on the
   host's files do not exist for the zygote or anything it forks.

Per request (the child for the next request is prepared ahead, off the critical path: right
after a request's result, or alongside a request still running after 3 ms):

1. ``unshare`` new mount, network, IPC, UTS, cgroup and PID namespaces; mount a fresh tmpfs
   (``size=tmp_bytes``, nosuid/nodev/noexec, owned by the uid) on ``/sandbox``; fork the
   child, PID 1 of the new PID namespace; ``setns`` back to the zygote's own namespaces;
2. the child, still root: mounts a fresh ``/proc``, sets its ``oom_score_adj`` to 1000 (the
   OOM killer's first choice), makes ``/proc`` read-only, keeps only ``/dev/null`` as
   stdin/stdout/stderr, its status pipe and the socket its request will come on (every other
   descriptor closed), drops the capability bounding set, ``setgroups([])``, switches to its
   unprivileged uid/gid (two per zygote, used in turn), sets no_new_privs, the parent-death
   signal and the seccomp filter, scrubs the environment, and waits;
3. the request: the zygote hands the child the server's stdout/stderr pipes and the body
   pipe; the child writes the input files, sets the rlimits and ``exec``s the code in
   ``__main__``; the zygote sends the server a pidfd of the child (so the server can kill the
   tree even if the zygote misbehaves), waits for it with the wall-clock limit (then
   ``SIGKILL``: the PID namespace's init dying takes every process in it along), reaps it and
   sends back the wait status, resource usage and the ``out/`` images as open descriptors.
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
import resource
import select
import shutil
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
# A run still going after this long gets the next request's child prepared alongside it.
_SPARE_OVERLAP_AFTER_MS = 3.0
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))
_SYSTEM_TOPS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


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
        linux.mount(
            None,
            target,
            None,
            linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV,
        )
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
                        elif sub == "bin" and entry.name.startswith("python"):
                            self.write(entry.path, b"", 0o755)
                            linux.mount(entry.path, self._at(entry.path), None, linux.MS_BIND)

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


class _Spare:
    """A child forked ahead of a request: in its namespaces, unprivileged, waiting for work."""

    def __init__(
        self,
        pid: int,
        pidfd: int,
        go: socket.socket,
        status_r: int,
        sbx_fd: int,
        uid: int,
        tmp_bytes: int,
        workdir: str,
    ) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.go = go
        self.status_r = status_r
        self.sbx_fd = sbx_fd
        self.uid = uid
        self.tmp_bytes = tmp_bytes
        self.workdir = workdir

    def discard(self, sandboxed: bool) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.close()
        if not sandboxed:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        self.go.close()
        for fd in (self.pidfd, self.status_r, self.sbx_fd):
            os.close(fd)


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
        self.seccomp = linux.seccomp_program() if linux.SECCOMP_SUPPORTED else b""
        self.last_cap = linux.last_capability()
        # The zygote holds the write end for its whole life; a child sees POLLHUP on the read
        # end once the zygote is gone (closes the race before PR_SET_PDEATHSIG takes hold).
        self.life_r, self.life_w = os.pipe()
        self.spare: _Spare | None = None
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
        if self.cgroup:
            # Join the slot's memory cgroup after the imports (their pages stay charged where
            # they were): every child is then born inside, no per-request migration. The OOM
            # killer, confined to the group, picks the sandboxed code (oom_score_adj 1000).
            with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
                f.write("0")
        if self.sandboxed:
            self._enter_root()
        t2 = _now()
        gc.collect()
        gc.freeze()
        if not self.one_shot:
            self.spare = self._make_spare(self.tmp_bytes)
        t3 = _now()
        self.timings = {
            "preload_ms": (t1 - t0) / 1e6,
            "root_ms": (t2 - t1) / 1e6,
            "spare_ms": (t3 - t2) / 1e6,
        }

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
        if self.spare is not None:
            self.spare.discard(self.sandboxed)
            self.spare = None

    # ------------------------------------------------------------------ the spare child

    def _make_spare(self, tmp_bytes: int) -> _Spare:
        """Fork the next request's child: new namespaces, fresh tmpfs and /proc, privileges
        dropped, seccomp on; it then waits for its request."""
        uid = self.uids[self.next_uid]
        self.next_uid = (self.next_uid + 1) % len(self.uids)
        go, go_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
        pid = os.fork()
        if pid == 0:
            self._spare_child(uid, workdir, go_child.fileno(), status_w)
        if self.sandboxed:
            for fd, nstype in self.ns_fds:
                linux.setns(fd, nstype)
        go_child.close()
        os.close(status_w)
        return _Spare(pid, os.pidfd_open(pid), go, status_r, sbx_fd, uid, tmp_bytes, workdir)

    def _spare_child(self, uid: int, workdir: str, go_fd: int, status_w: int) -> NoReturn:
        status_fd = status_w
        try:
            t = {"c_fork": _now()}
            linux.set_pdeathsig(signal.SIGKILL)
            os.close(self.life_w)
            if select.select([self.life_r], [], [], 0)[0]:
                os._exit(wire.EXIT_SETUP_FAILED)  # the zygote is already gone
            os.setsid()
            if self.sandboxed:
                flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
                linux.mount("proc", "/proc", "proc", flags)
                # The OOM killer's first choice, then /proc read-only.
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")
                remount = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
                linux.mount(None, "/proc", None, remount | flags)
            # fds: 0-2 /dev/null (1 and 2 until the request), 3 status, 4 the go socket;
            # nothing else (setup errors go to the status pipe).
            devnull = os.open("/dev/null", os.O_RDWR)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (devnull, status_w, go_fd)]
            for target, fd in zip((0, 1, 2, 3, 4), (*high[:1] * 3, *high[1:]), strict=True):
                os.dup2(fd, target)
            status_fd = 3
            os.closerange(5, 1 << 20)
            os.chdir(workdir)
            if self.is_root:
                if self.sandboxed:
                    linux.drop_bounding_set(self.last_cap)
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            linux.set_no_new_privs()
            linux.set_pdeathsig(signal.SIGKILL)  # cleared by the credential change
            linux.set_dumpable(True)
            if self.sandboxed and self.seccomp:
                linux.install_seccomp(self.seccomp)
            os.mkdir("out", 0o755)
            os.mkdir("tmp", 0o1777)
            os.environ.clear()
            os.environ.update(wire.child_env(workdir))
            _fresh_stdio()
            gc.collect()
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

    # ------------------------------------------------------------------ one request

    def handle(self, header: dict[str, Any], fds: list[int]) -> None:
        t: dict[str, int] = {"z_recv": _now()}
        if len(fds) != 4:
            for fd in fds:
                os.close(fd)
            return
        out_w, err_w, body_r, res_fd = fds
        res = socket.socket(fileno=res_fd)
        limits: dict[str, Any] = header["limits"]
        tmp_bytes = int(limits["tmp_bytes"])
        child = self.spare
        self.spare = None
        if child is not None and child.tmp_bytes != tmp_bytes:
            child.discard(self.sandboxed)
            child = None
        if child is None:
            child = self._make_spare(tmp_bytes)
        t["z_spare"] = _now()
        order = json.dumps({"limits": limits}).encode()
        try:
            socket.send_fds(child.go, [order], [out_w, err_w, body_r])
        except OSError:
            child.discard(self.sandboxed)  # the spare died; make another
            child = self._make_spare(tmp_bytes)
            socket.send_fds(child.go, [order], [out_w, err_w, body_r])
        t_go = t["z_go"] = _now()
        for fd in (out_w, err_w, body_r):
            os.close(fd)
        with contextlib.suppress(OSError):
            socket.send_fds(res, [wire.PIDFD_MESSAGE], [child.pidfd])
        poller = select.poll()
        poller.register(child.pidfd, select.POLLIN)
        deadline = t_go + int(float(limits["wall_s"]) * 1e9)

        def wait_ms(cap_ms: float | None = None) -> bool:
            left_ms = (deadline - _now()) / 1e6
            if cap_ms is not None:
                left_ms = min(left_ms, cap_ms)
            return bool(poller.poll(max(0, int(left_ms) + 1)))

        # Short runs finish before the next child is prepared (which would delay them);
        # longer ones get the next child prepared while they run.
        finished = wait_ms(_SPARE_OVERLAP_AFTER_MS)
        t["z_polled"] = _now()
        if not finished and not self.one_shot:
            self.spare = self._make_spare(self.tmp_bytes)
            t["z_next_spare"] = _now()
        timed_out = not (finished or wait_ms())
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        _, wstatus, usage = os.wait4(child.pid, 0)
        t["z_exit"] = _now()
        status_text = _read_status(child.status_r)
        if not self.sandboxed:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)  # whatever stayed in its process group
        images, skipped, bad = _open_images(child.sbx_fd, int(limits["max_images_out"]))
        child.close()
        result = {
            "uid": child.uid,
            "exit_code": os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else None,
            "signal": os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None,
            "timed_out": timed_out,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_kb": usage.ru_maxrss,
            "status": status_text,
            "images_skipped": skipped,
            "images_bad": bad,
            "t": t,
        }
        try:
            socket.send_fds(res, [json.dumps(result).encode()], images)
        except OSError:
            pass
        finally:
            for fd in images:
                os.close(fd)
            res.close()
            if not self.sandboxed:
                shutil.rmtree(child.workdir, ignore_errors=True)
        if self.spare is None and not self.one_shot:
            self.spare = self._make_spare(self.tmp_bytes)


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


def _text_stream(fd: int, mode: str) -> Any:
    """A line-buffered text stream on ``fd`` (never closes it)."""
    return open(fd, mode, encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)


def _fresh_stdio() -> None:
    sys.stdin = _text_stream(0, "r")
    sys.stdout = _text_stream(1, "w")
    sys.stderr = _text_stream(2, "w")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr  # type: ignore[misc]
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
    status = {"exit": exit_code, "error": kind, "exc": summary, "t": t}
    with contextlib.suppress(BaseException):
        os.write(3, json.dumps(status).encode()[: wire.MAX_STATUS])
    os._exit(exit_code & 0xFF)


# --------------------------------------------------------------------------- zygote helpers


def _read_status(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(OSError):
        while size < wire.MAX_STATUS:
            chunk = os.read(fd, wire.MAX_STATUS - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _open_images(sbx_fd: int, limit: int) -> tuple[list[int], int, int]:
    """Open (never read) up to ``limit`` regular image files in out/, in name order."""
    try:
        out_fd = os.open("out", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=sbx_fd)
    except OSError:
        return [], 0, 0
    fds: list[int] = []
    skipped = bad = 0
    try:
        names = sorted(n for n in os.listdir(out_fd) if n.lower().endswith(_IMAGE_SUFFIXES))
        for name in names:
            if len(fds) >= limit:
                skipped += 1
                continue
            try:
                fd = os.open(
                    name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=out_fd,
                )
            except OSError:
                bad += 1
                continue
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fds.append(fd)
            else:
                os.close(fd)
                bad += 1
    finally:
        os.close(out_fd)
    return fds, skipped, bad


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
    one_shot = bool(config.get("one_shot"))
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 65536, 8)
        except OSError:
            break
        if not msg:
            break
        try:
            zygote.handle(json.loads(msg), fds)
        except BaseException as exc:  # noqa: BLE001 - namespaces may be half-switched: leave
            with contextlib.suppress(BaseException):
                print(f"axpo sandbox zygote: {type(exc).__name__}: {exc}", file=sys.stderr)
            os._exit(2)
        if one_shot:
            break
    with contextlib.suppress(BaseException):
        zygote.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
