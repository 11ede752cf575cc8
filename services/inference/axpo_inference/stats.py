"""Engine statistics: a vLLM stat logger that keeps the latest KV cache usage for
:meth:`InferenceEngine.status`."""

from __future__ import annotations

from typing import Any


def make_kv_logger(sink: dict[str, float]) -> Any:
    """A vLLM ``StatLoggerBase`` class that writes ``kv_cache_usage`` into ``sink`` at every
    engine step (vLLM instantiates the class itself, hence a class built around ``sink``)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _KvUsageLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, *a: Any, **k: Any) -> None:
            if scheduler_stats is not None:
                sink["kv_cache_usage"] = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return _KvUsageLogger
