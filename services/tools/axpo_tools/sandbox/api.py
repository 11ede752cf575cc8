"""The sandbox's value types: limits in, result out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from axpo.contracts.domain import ToolErrorKind

__all__ = ["RunResult", "SandboxLimits", "SandboxUnavailableError"]


class SandboxUnavailableError(RuntimeError):
    """This host lacks an isolation primitive the sandbox needs (the message names it)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-request limits. Every one is enforced by the kernel, not by the sandboxed code.

    * ``wall_s`` (10 s): wall-clock time from the sandboxed process's start; at the limit the
      whole process tree (its PID namespace) is killed and the result is ``TIMEOUT``.
    * ``cpu_s`` (10 s): ``RLIMIT_CPU`` of each sandboxed process, rounded up to whole seconds;
      exceeding it kills the process with ``SIGXCPU`` and is reported as ``TIMEOUT``.
    * ``memory_bytes`` (1 GiB): ``RLIMIT_AS`` (address space) of each sandboxed process. It
      includes what the interpreter with numpy and PIL already maps (~130 MiB here). Exceeding
      it raises ``MemoryError`` and is reported as ``RESOURCE_LIMIT``. Where the host allows
      memory cgroups, the run's processes *together* are also capped at ``memory_bytes +
      tmp_bytes`` (the kernel OOM-kills inside the run only; ``RESOURCE_LIMIT`` if that hits
      the main process, else a note in the message).
    * ``file_bytes`` (16 MiB): ``RLIMIT_FSIZE``, the largest file the code may write.
    * ``tmp_bytes`` (64 MiB): size of the private tmpfs that is the working directory (input
      files, ``out/``, ``/tmp``) together. (The next request's process is prepared ahead with
      the sandbox's default; a call with another ``tmp_bytes`` takes the slower path.)
    * ``max_processes`` (16): ``RLIMIT_NPROC`` of the sandbox's own uid: processes *and
      threads* alive at once, the first process included.
    * ``output_bytes`` (16 KiB): stdout and stderr kept, together; the rest is dropped and a
      marker ``[... output truncated: N bytes omitted]`` says how much. Output beyond
      ``OUTPUT_KILL_FACTOR`` (64) times this, at least 1 MiB, kills the run
      (``RESOURCE_LIMIT``).
    * ``max_images_out`` (4): how many images from ``out/`` come back.
    * ``open_files`` (256): ``RLIMIT_NOFILE``.
    """

    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    tmp_bytes: int = 64 << 20
    max_processes: int = 16
    output_bytes: int = 16 << 10
    max_images_out: int = 4
    open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value}")
        for name in ("memory_bytes", "file_bytes", "tmp_bytes", "max_processes", "open_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"SandboxLimits.{name} must be at least 1")
        if self.output_bytes < 0:
            raise ValueError("SandboxLimits.output_bytes must be >= 0")
        if not 0 <= self.max_images_out <= 64:
            raise ValueError("SandboxLimits.max_images_out must be between 0 and 64")
        if self.open_files < 16:
            raise ValueError("SandboxLimits.open_files must be at least 16")


@dataclass(frozen=True)
class RunResult:
    """What one run produced.

    ``error_kind`` is ``None`` when the code ran to its end, including when it raised: a
    traceback in ``stderr`` with a non-zero ``exit_code`` is the code's error, not the
    sandbox's. Otherwise it says why the sandbox stopped it: ``TIMEOUT`` (wall clock or CPU
    time), ``RESOURCE_LIMIT`` (memory, disk, processes, open files, output), or
    ``SANDBOX_VIOLATION`` (killed by the syscall filter), or ``INTERNAL`` (the sandbox itself
    failed). ``exit_code`` is the process's exit status, ``-signal`` when a signal killed it,
    ``None`` when it never ran or its status is unknown. ``images`` are the PNG files the code
    left in ``out/`` (``.png``; ``.jpg``/``.jpeg`` are converted to PNG), in name order.
    ``timings`` holds per-phase milliseconds for diagnostics.
    """

    stdout: str
    stderr: str
    images: tuple[bytes, ...] = ()
    exit_code: int | None = None
    error_kind: ToolErrorKind | None = None
    message: str = ""
    latency_ms: float = 0.0
    timings: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ok(self) -> bool:
        """The code ran to its end and exited with status 0."""
        return self.error_kind is None and self.exit_code == 0
