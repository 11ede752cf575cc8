"""axpo: reinforcement learning for vision-language models that think and use tools.

This is the core package every service shares. Its parts (ARCHITECTURE.md follows one question
through all of them):

- :mod:`axpo.v1`: the wire contracts, generated from ``protos/`` (do not edit).
- :mod:`axpo.contracts`: domain types, the converters to and from the wire, the chat format.
- :mod:`axpo.settings`: one settings module per service, the job spec, a small shared base.
- :mod:`axpo.algorithm`: GRPO and AXPO as pure functions (advantages, selection, loss,
  diagnostics).
- :mod:`axpo.queue`: the trajectory queue on Redis Streams (prompts in, groups out).
- :mod:`axpo.rpc`: starting a gRPC service and opening a channel to one, the same way everywhere.
- :mod:`axpo.telemetry`: structured logs and per-step metrics.
- :mod:`axpo.cli`: the ``axpo`` command; :mod:`axpo.local`: ``axpo run``, the whole system as
  local processes.
- :mod:`axpo.study`: generated tasks, the tiny test model, the run report.

It must stay light to import: no torch, no vLLM, no transformers, no matplotlib
(tests/unit/test_core_imports.py checks it). The services live under ``services/`` and never
import each other.
"""

__version__ = "0.1.0"
