"""Settings of the api service (``axpo serve api``, ``AXPO_API_*``): the control plane's HTTP
server (``services/api``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from axpo.settings.base import LogSettings, ServiceSettings, service_settings


class ApiSettings(ServiceSettings):
    """The api service (``axpo serve api``): jobs over HTTP, all state in Redis."""

    model_config = service_settings("AXPO_API_")

    host: str = "127.0.0.1"
    """Address to bind. Use 0.0.0.0 in containers."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    """TCP port; 0 picks a free port (the bound port is logged and written to --port-file)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """``redis://host:port/db`` of the Redis holding the jobs: the queue's server, so the
    learner and rollout workers see the same jobs. Every api replica uses the same one."""
    key_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._:-]+$")] = "axpo"
    """Prefix of the job store's Redis keys (the queue's ``key_prefix``)."""
    tokens: Annotated[tuple[str, ...], NoDecode] = ()
    """Bearer tokens accepted, comma-separated in ``AXPO_API_TOKENS`` (``a,b``). Together with
    ``tokens_file``; at least one token must be configured."""
    tokens_file: Path | None = None
    """A file of accepted tokens, one per line (blank lines and ``#`` comments ignored): a
    mounted Kubernetes Secret. Read at start."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    """Largest request body accepted, in bytes; larger ones get 413."""
    rate_limit_per_s: Annotated[float, Field(gt=0)] = 50.0
    """Requests per second each token may make, sustained (a token bucket per token, in each
    api process: N replicas allow N times this)."""
    rate_limit_burst: Annotated[int, Field(ge=1)] = 100
    """Requests a token may make at once above the sustained rate before getting 429."""
    idempotency_ttl_s: Annotated[int, Field(ge=1)] = 24 * 3600
    """How long an ``Idempotency-Key`` keeps naming the job it created, in seconds."""
    sse_ping_s: Annotated[float, Field(gt=0)] = 15.0
    """An SSE stream with no event for this long gets a comment line, so proxies keep it open
    and a dead client is noticed."""
    log: LogSettings = LogSettings()
    """Logging (one line per request: method, path, status, latency, request id)."""

    @field_validator("tokens", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    def all_tokens(self) -> tuple[str, ...]:
        """``tokens`` plus those of ``tokens_file``; raises ValueError when there are none or
        the file cannot be read (the service must not start open to anyone)."""
        found = list(self.tokens)
        if self.tokens_file is not None:
            try:
                text = self.tokens_file.read_text()
            except OSError as exc:
                raise ValueError(f"tokens_file {self.tokens_file}: {exc.strerror}") from exc
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append(line)
        if not found:
            raise ValueError(
                "no api token configured: set AXPO_API_TOKENS (comma-separated) or "
                "AXPO_API_TOKENS_FILE"
            )
        return tuple(dict.fromkeys(found))
