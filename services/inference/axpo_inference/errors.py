"""Errors the engine raises for requests it refuses. server.py maps them to gRPC codes."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request itself is wrong (INVALID_ARGUMENT). The message starts with the field."""


class PreconditionError(RuntimeError):
    """The request is well formed but the server's state forbids it (FAILED_PRECONDITION),
    e.g. a weight version that does not increase or a drain that timed out."""


class EngineDeadError(RuntimeError):
    """The vLLM engine stopped; the service cannot answer (UNAVAILABLE)."""
