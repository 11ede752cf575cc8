"""The pieces every service's settings share: gRPC server and client, logging, the
config dicts, and one formatter for validation errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)
"""Every settings model: unknown fields are errors, docstrings are the field help, frozen."""


def service_settings(prefix: str) -> SettingsConfigDict:
    """The config of a service's top-level settings: environment prefix, ``__`` for nesting."""
    return SettingsConfigDict(
        env_prefix=prefix,
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


class ServiceSettings(BaseSettings):
    """Base of every service's top-level settings (``AXPO_<SERVICE>_*``).

    A nested field set in part (``AXPO_VERIFIER_RPC__HOST=0.0.0.0``, or a partial mapping) keeps
    the rest of that field's default, not of its class: pydantic-settings would otherwise
    build ``RpcServerSettings(host="0.0.0.0")`` with the class's port 0 instead of the
    verifier's 50053 (found by the podman smoke test: the container listened on a random
    port), and ``AXPO_ROLLOUT_INFERENCE__TARGET`` would drop the inference deadline of 600 s
    to the class's 30 s."""

    @model_validator(mode="before")
    @classmethod
    def _keep_nested_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            name: _merged(cls.model_fields[name].default, value)
            if name in cls.model_fields
            else value
            for name, value in data.items()
        }


def _merged(default: Any, value: Any) -> Any:
    """``value`` over ``default`` where ``value`` is a mapping given for a model default,
    recursively; ``value`` unchanged otherwise."""
    if not (isinstance(default, BaseModel) and isinstance(value, dict)):
        return value
    out: dict[str, Any] = {}
    for name in type(default).model_fields:
        out[name] = getattr(default, name)
    for name, sub in value.items():
        out[name] = _merged(out.get(name), sub)
    return out


class RpcServerSettings(BaseModel):
    """How a service listens."""

    model_config = MODEL_CONFIG

    host: str = "127.0.0.1"
    """Address to bind. Use 0.0.0.0 in containers."""
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    """TCP port; 0 picks a free port (the bound port is logged and returned)."""
    max_workers: Annotated[int, Field(ge=1)] = 8
    """Threads serving RPCs concurrently."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """Largest request or response message accepted, in bytes."""
    auth_token: str | None = None
    """When set, every RPC except health checks must carry ``authorization: Bearer <token>``."""
    grace_s: Annotated[float, Field(ge=0)] = 5.0
    """On SIGTERM, seconds in-flight RPCs get to finish before they are cancelled."""
    reflection: bool = True
    """Expose gRPC server reflection (grpcurl, grpcui)."""
    log_requests: bool = True
    """Log one line per RPC: method, status code, latency."""


class RpcClientSettings(BaseModel):
    """How a caller reaches a service."""

    model_config = MODEL_CONFIG

    target: str = "127.0.0.1:50051"
    """host:port of the service."""
    deadline_s: Annotated[float, Field(gt=0)] = 30.0
    """Default deadline of each call, in seconds, when the caller gives none."""
    max_attempts: Annotated[int, Field(ge=1, le=5)] = 4
    """Attempts per call, retried only on UNAVAILABLE (gRPC caps this at 5)."""
    initial_backoff_s: Annotated[float, Field(gt=0)] = 0.1
    """Backoff before the first retry, in seconds (then multiplied, with jitter)."""
    max_backoff_s: Annotated[float, Field(gt=0)] = 2.0
    """Longest backoff between retries, in seconds."""
    backoff_multiplier: Annotated[float, Field(ge=1)] = 2.0
    """Factor applied to the backoff after each retry."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """Largest message sent or received, in bytes."""
    auth_token: str | None = None
    """Sent as ``authorization: Bearer <token>`` when set."""


class LogSettings(BaseModel):
    """Structured logging."""

    model_config = MODEL_CONFIG

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Minimum level written."""
    format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (for collectors); ``text``: key=value for people."""


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: ``  field.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {err['msg']}{shown}")
    return "\n".join(lines)
