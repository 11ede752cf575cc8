"""Settings of a rollout worker (``axpo serve rollout``, ``AXPO_ROLLOUT_*``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from axpo.settings.base import (
    LogSettings,
    RpcClientSettings,
    RpcServerSettings,
    ServiceSettings,
    service_settings,
)
from axpo.settings.queue import QueueSettings


class RolloutSettings(ServiceSettings):
    """A rollout worker (``axpo serve rollout``): takes questions from the prompts stream, runs
    the agent loop against the inference, tool and verifier services, puts scored groups."""

    model_config = service_settings("AXPO_ROLLOUT_")

    rpc: RpcServerSettings = RpcServerSettings(port=50055, max_workers=4)
    """Where the worker's health endpoint listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    job_spec: str = ""
    """YAML job spec (required unless ``job_store``): its ``name`` is the job, ``algorithm``
    and ``rollout`` say how groups are sampled, ``reward`` how they are scored."""
    tokenizer: str = ""
    """Checkpoint directory whose ``tokenizer.json`` the loop uses; unset: the job's model."""
    inference: RpcClientSettings = RpcClientSettings(target="127.0.0.1:50051", deadline_s=600.0)
    """The inference service (deadline covers one whole generation)."""
    tools: RpcClientSettings = RpcClientSettings(target="127.0.0.1:50052", deadline_s=60.0)
    """The tool server."""
    verifier: RpcClientSettings = RpcClientSettings(target="127.0.0.1:50053", deadline_s=60.0)
    """The reward verifier."""
    job_store: bool = False
    """Follow the deployment's job store (Redis: the queue's server and key prefix) instead of
    ``job_spec``: sample for the job the learner runs, from the moment its first weights are
    served, until it ends, then wait for the next; idle while none runs."""
    job_poll_s: Annotated[float, Field(gt=0)] = 1.0
    """With ``job_store``: how often the worker looks at the job store, in seconds."""
    queue: QueueSettings = QueueSettings()
    """The trajectory queue (Redis): prompts in, groups out."""
    consumer: str = ""
    """Consumer name in the prompts stream's consumer group: unique per worker and stable
    across its restarts (a restarted worker reads its unacknowledged prompts again first).
    Empty: this host's name, which is unique per container of a compose service's replicas
    and per pod (:meth:`consumer_name`)."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Port of the worker's Prometheus ``/metrics`` (0 picks one); unset: none."""
    health_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    """How long the worker waits for its services to become healthy at start."""

    def consumer_name(self) -> str:
        """:attr:`consumer`, or this host's name when it is empty."""
        import socket

        return self.consumer or socket.gethostname()
