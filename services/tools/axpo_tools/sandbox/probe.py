# Zygote side: imported before pivot_root hides this package, so never import from it lazily.
"""Which isolation primitives this host lacks: ``python -I -m axpo_tools.sandbox.zygote
--probe`` (a fresh interpreter, as root) tries each step the sandbox uses, in order, in a
throwaway child, and prints the missing ones as a JSON list (empty: all there)."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from axpo_tools.sandbox import linux
from axpo_tools.sandbox.rootfs import staging_dir

__all__ = ["probe"]


def _probe_steps() -> Iterator[tuple[str, Any]]:
    """Each isolation step in the order the sandbox uses them, as (name, action)."""
    yield "mount namespace", lambda: linux.unshare(linux.CLONE_NEWNS)
    yield "private mounts", lambda: linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    yield "tmpfs mount", lambda: linux.mount("tmpfs", staging_dir(), "tmpfs", 0, "size=1m")
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
    root = staging_dir()
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
