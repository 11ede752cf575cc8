"""axpo: reinforcement learning for vision-language models that think and use tools.

This is the core package every service shares: the generated contracts (``axpo.v1``), domain
types, converters between them, configuration, logging, gRPC helpers and the ``axpo`` CLI.
It must stay light to import: no torch, no vLLM.
"""

__version__ = "0.1.0"
