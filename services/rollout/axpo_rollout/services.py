"""The three services an agent loop needs (verifier, tools, inference), started as local
processes for a command that samples outside a training run: ``axpo bench rollout`` and
``axpo eval``.

Each is ``axpo serve <service>`` through :class:`axpo.local.processes.Processes` (logs and port
files under ``run_dir``), configured as ``axpo run`` configures them: the job's ``run.tools``
and ``run.inference`` settings, the model directory, the job's seed. :func:`local_services`
waits until all three are healthy, yields a :class:`~axpo_rollout.clients.GrpcBackend` to
them, and closes it and stops the processes however the block ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from axpo.local.processes import Child, Processes, settings_env
from axpo.settings.base import RpcClientSettings
from axpo.settings.job import JobSpec
from axpo_rollout.clients import GrpcBackend

INFERENCE_DEADLINE_S = 600.0
"""gRPC deadline of a Generate/Resume call (a long batch on a CPU can take minutes)."""
SERVICE_DEADLINE_S = 120.0
"""gRPC deadline of a tool or verifier call."""


@dataclass(frozen=True)
class LocalServices:
    """Running services: their ``host:port`` targets, a backend to them, how long they took to
    become healthy."""

    inference: str
    tools: str
    verifier: str
    backend: GrpcBackend
    startup_s: float


def _target(child: Child) -> str:
    return f"127.0.0.1:{child.port}"


@contextmanager
def local_services(
    spec: JobSpec, model: Path, run_dir: Path, *, out: IO[str] | None = None
) -> Iterator[LocalServices]:
    """Start verifier, tools and inference (serving ``model``) for ``spec``; yield once they
    are healthy (``spec.run.startup_timeout_s``, else :class:`~axpo.local.processes.RunError`
    with the failing process's log tail); stop them all when the block ends."""
    procs = Processes(run_dir.resolve(), out=out if out is not None else sys.stderr)
    backend: GrpcBackend | None = None
    try:
        verifier = procs.start("verifier", "verifier", {})
        tools = procs.start("tools", "tools", settings_env("AXPO_TOOLS_", spec.run.tools))
        inference = procs.start(
            "inference",
            "inference",
            {
                **settings_env("AXPO_INFERENCE_", spec.run.inference),
                "AXPO_INFERENCE_MODEL": str(Path(model).resolve()),
                "AXPO_INFERENCE_SEED": str(spec.seed),
            },
        )
        started = time.perf_counter()
        procs.wait_ready([verifier, tools, inference], spec.run.startup_timeout_s)
        startup_s = time.perf_counter() - started
        backend = GrpcBackend(
            RpcClientSettings(target=_target(inference), deadline_s=INFERENCE_DEADLINE_S),
            RpcClientSettings(target=_target(tools), deadline_s=SERVICE_DEADLINE_S),
            RpcClientSettings(target=_target(verifier), deadline_s=SERVICE_DEADLINE_S),
        )
        yield LocalServices(
            _target(inference), _target(tools), _target(verifier), backend, startup_s
        )
    finally:
        if backend is not None:
            backend.close()
        procs.stop_all()
