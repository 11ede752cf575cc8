# Zygote side: imported before pivot_root hides this package, so never import from it lazily.
"""The sandbox's root filesystem, built by the zygote once at its start.

A small tmpfs holding read-only bind mounts of ``/usr`` (``/bin``, ``/lib``... as the host's
symlinks into it), the Python installation and the venv's site-packages (of the venv's
``bin/`` only the interpreter); a minimal ``/etc``; ``/dev`` with null, zero, full, random,
urandom; empty ``/proc`` and ``/sandbox`` mount points; ``/tmp`` a link into ``/sandbox``.
The zygote then ``pivot_root``s into it (:meth:`axpo_tools.sandbox.zygote.Zygote.start`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import sys

from axpo_tools.sandbox import linux, wire

__all__ = ["RootBuilder", "staging_dir"]

_ROOT_TMPFS = "size=16m,nr_inodes=4096,mode=0755"
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))
_SYSTEM_TOPS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_INTERPRETER_NAME = re.compile(r"python(3(\.[0-9]+)?)?")
_READ_ONLY_REBIND = (
    linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
)


class RootBuilder:
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


def staging_dir() -> str:
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
