"""Memory cgroups that cap a run's whole process tree (server side; best effort).

``RLIMIT_AS`` bounds each process, so a tree of ``max_processes`` processes could still use
``max_processes * memory_bytes``. Where the host lets us create memory cgroups (cgroup v1 with
the memory controller, or v2 with memory delegated to our cgroup), each worker slot gets its
own group under ours. Its zygote moves in once, after its imports (so what it imported stays
charged where it was), and every process it forks is born inside: no per-request cgroup
migration, which costs milliseconds on cgroup v1. The cap is ``memory_bytes + tmp_bytes``
(tmpfs pages are charged to the writer) plus an allowance for the zygote and its prepared
child; sandboxed processes have ``oom_score_adj`` 1000, so the kernel's OOM killer, confined
to the group, picks the sandboxed code.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Collection

__all__ = ["MemoryCgroups"]

_counter = itertools.count()


def _own_cgroup_dir() -> tuple[str, int] | None:
    """(directory of this process's memory cgroup, cgroup version), if one is mounted."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f.read().splitlines()]
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    for fields in mounts:
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        root, mount_point = fields[3], fields[4]
        if fstype == "cgroup" and "memory" in options and v1_path is not None:
            rel = os.path.relpath(v1_path, root) if v1_path.startswith(root) else None
            if rel is not None:
                return os.path.normpath(os.path.join(mount_point, rel)), 1
    for fields in mounts:
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2" and v2_path is not None:
            root, mount_point = fields[3], fields[4]
            if v2_path.startswith(root):
                rel = os.path.relpath(v2_path, root)
                return os.path.normpath(os.path.join(mount_point, rel)), 2
    return None


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class MemoryCgroups:
    """One memory cgroup per key (a worker slot), under a group of our own."""

    def __init__(self, base: str, version: int, paths: dict[int, str]) -> None:
        self.base = base
        self.version = version
        self.paths = paths
        self._limits: dict[int, int] = {}
        self._oom_kills: dict[int, int] = {}

    @classmethod
    def create(cls, keys: Collection[int]) -> tuple[MemoryCgroups | None, str]:
        """The groups, or ``None`` and why not."""
        found = _own_cgroup_dir()
        if found is None:
            return None, "no memory cgroup hierarchy mounted"
        parent, version = found
        base = os.path.join(parent, f"axpo-sandbox-{os.getpid()}-{next(_counter)}")
        groups = cls(base, version, {})
        try:
            os.mkdir(base)
            if version == 2:
                _write(os.path.join(base, "cgroup.subtree_control"), "+memory")
            for key in keys:
                path = os.path.join(base, f"slot{key}")
                os.mkdir(path)
                groups.paths[key] = path
            groups.set_limit(groups.paths, 1 << 30)
        except OSError as exc:
            groups.remove()
            return None, f"cannot create memory cgroups under {parent}: {exc.strerror}"
        return groups, ""

    def set_limit(self, keys: Collection[int], limit_bytes: int) -> None:
        """Cap the groups of ``keys`` (a slot's own: no other thread writes them meanwhile)."""
        for key in keys:
            if self._limits.get(key) == limit_bytes:
                continue
            path = self.paths[key]
            if self.version == 1:
                _write(os.path.join(path, "memory.limit_in_bytes"), str(limit_bytes))
            else:
                _write(os.path.join(path, "memory.max"), str(limit_bytes))
                with contextlib.suppress(OSError):
                    _write(os.path.join(path, "memory.swap.max"), "0")
            self._limits[key] = limit_bytes

    def pids(self, key: int) -> list[int] | None:
        """The processes in ``key``'s group (``None`` if it cannot be read)."""
        try:
            with open(os.path.join(self.paths[key], "cgroup.procs"), "rb") as f:
                return [int(line) for line in f.read().split()]
        except (OSError, ValueError):
            return None

    def oom_killed(self, key: int) -> bool:
        """Whether the kernel OOM-killed in ``key``'s group since the last call."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            with open(os.path.join(self.paths[key], name)) as f:
                fields = dict(line.split() for line in f.read().splitlines() if " " in line)
            count = int(fields.get("oom_kill", "0"))
        except (OSError, ValueError):
            return False
        seen = self._oom_kills.get(key, 0)
        self._oom_kills[key] = count
        return count > seen

    def remove(self) -> None:
        """Remove the groups (they must be empty: call after the processes are gone)."""
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.base)
