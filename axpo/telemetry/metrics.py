"""Exposing per-step metrics: Prometheus gauges over HTTP, and a JSON-lines file.

:class:`StepMetrics` keeps its own ``CollectorRegistry`` (never the process-global one, so
two in one process, or a test, do not collide) with one gauge per metric, named
``axpo_<key>`` where every character of the key outside ``[A-Za-z0-9_]`` becomes ``_``
(``time.generate_s`` -> ``axpo_time_generate_s``). Gauges for every diagnostic key
(:data:`axpo.algorithm.diagnostics.DIAGNOSTIC_KEYS`) exist from the start; any other key passed to
:meth:`StepMetrics.update` (the learner's ``loss``, ``train_s``, ...) gets a gauge on first
sight. ``axpo_step`` holds the step of the last update.

:func:`append_jsonl` appends one record to the metrics file the report reads
(``run_dir/metrics.jsonl``), durably: flushed and fsynced before it returns.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server

from axpo.algorithm.diagnostics import DIAGNOSTIC_HELP

PREFIX = "axpo"
_INVALID = re.compile(r"[^A-Za-z0-9_]")


def metric_name(key: str, prefix: str = PREFIX) -> str:
    """The Prometheus name of metric ``key``.

    >>> metric_name("tool_error_rate.malformed_call")
    'axpo_tool_error_rate_malformed_call'
    """
    return f"{prefix}_{_INVALID.sub('_', key)}"


class StepMetrics:
    """Gauges of the latest optimizer step, in a private registry, optionally served over HTTP.

    ``help_texts`` adds or overrides HELP texts (keys as passed to :meth:`update`).
    """

    def __init__(self, help_texts: Mapping[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._help = {**DIAGNOSTIC_HELP, **(help_texts or {})}
        self._lock = threading.Lock()
        self._gauges: dict[str, Gauge] = {}
        self._keys_by_name: dict[str, str] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._step = Gauge(
            metric_name("step"), "Optimizer step of the last update.", registry=self.registry
        )
        self._keys_by_name[metric_name("step")] = "step"
        for key in DIAGNOSTIC_HELP:
            self._gauge(key)

    def _gauge(self, key: str) -> Gauge:
        gauge = self._gauges.get(key)
        if gauge is not None:
            return gauge
        name = metric_name(key)
        other = self._keys_by_name.get(name)
        if other is not None:
            raise ValueError(f"metric {key!r} would be exported as {name}, as {other!r} is")
        gauge = Gauge(
            name, self._help.get(key, f"{key} (per optimizer step)."), registry=self.registry
        )
        self._gauges[key] = gauge
        self._keys_by_name[name] = key
        return gauge

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Set the gauges to ``metrics`` (ints and bools are numbers too) and ``axpo_step`` to
        ``step``; a ``"step"`` key in ``metrics`` is ignored, so a whole metrics record can be
        passed. Raises TypeError on a non-numeric value, ValueError on a key whose exported
        name clashes with another's; nothing is set then."""
        metrics = {k: v for k, v in metrics.items() if k != "step"}
        for key, value in metrics.items():
            if not isinstance(value, int | float):
                raise TypeError(f"metric {key!r}: {value!r} is not a number")
        with self._lock:
            gauges = [(self._gauge(key), float(value)) for key, value in metrics.items()]
            for gauge, value in gauges:
                gauge.set(value)
            self._step.set(step)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; port 0 picks a free port.
        Returns the bound port. Raises RuntimeError when already serving."""
        if self._server is not None:
            raise RuntimeError("StepMetrics is already serving")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP server, if one runs. Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> StepMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` to ``path`` as one line of strict JSON (NaN and infinities become
    null), creating parent folders; flushed and fsynced before returning."""
    line = json.dumps(_json_safe(record), allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
