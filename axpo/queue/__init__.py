"""The trajectory queue: Redis Streams with consumer groups, one set of keys per job.

Keys (``P`` = ``QueueSettings.key_prefix``, ``J`` = the job id)::

    P:J:prompts   stream   work items for rollout workers (consumer group ``rollout``)
    P:J:groups    stream   finished groups for the learner (consumer group ``learner``)
    P:J:dead      stream   dead letters: the original entry's fields plus source, entry_id,
                           reason and consumer
    P:J:stats     hash     counters (see :class:`QueueCounters`)
    P:img:<sha>   hash     one image, content-addressed: ``data`` (bytes) and ``refs``

**Entries.** A groups entry has the fields ``group`` (``axpo.v1.Group`` protobuf whose images
carry sha256 and mime type but no bytes), ``images`` (comma-separated sha256 of those images)
and ``version`` (the group's policy version). A prompts entry has one field ``task``: a JSON
object ``{"task_id": str, "question_id": str, "policy_version": int, "data": {...}}``
(:class:`PromptTask`; ``data`` is free-form JSON for the rollout worker, e.g. the dataset item
and sampling overrides). Prompts need no protobuf: they never cross a service boundary other
than this queue, and JSON keeps them readable with ``redis-cli``.

**Images** are stored once per content hash. :meth:`TrajectoryQueue.put_group` stores each
image with ``HSETNX`` and increments its ``refs`` in the same Lua script as the XADD, so a group
is never visible without its images. Acknowledging a group (trained, dead-lettered or dropped
as stale) decrements ``refs`` atomically with the XACK and deletes the image at zero. The TTL
(``image_ttl_s``, refreshed on every put and take) is only a backstop for images whose entries
were removed outside this API.

**Delivery contract.**

- An entry is acknowledged only after its effect is durable. For the learner: it records the
  entry ids it consumed in its checkpoint (the queue position), writes the checkpoint, and only
  then calls :meth:`ack_groups`. After a crash it first calls ``ack_groups(checkpoint ids)``
  again (idempotent: an id that is no longer pending is ignored), then takes: the groups
  redelivered are exactly those not in the checkpoint. Acks are atomic with the release of the
  images and the counters (one Lua script), and with ``appendfsync always`` they survive a
  crash of Redis (``axpo.queue.redis_server``).
- Entries taken but not acknowledged are redelivered to the *same consumer name* on its next
  start (its pending entries are read from id ``0`` before new ones), so consumers should use
  stable names (``learner-0``); entries of a consumer that never comes back are taken over by
  another with :meth:`reclaim` (XAUTOCLAIM) once idle for ``claim_idle_ms``.
- An entry that cannot be used (undecodable protobuf, a trajectory that fails
  ``Trajectory.validate``, a reference to an image the group does not carry, an image that is
  missing from Redis or whose bytes do not match its hash) is moved to the dead-letter stream
  with the reason, acknowledged and counted; it never blocks the stream and never raises.
- Backpressure: :meth:`put_group` refuses to add while ``max_backlog`` groups are
  unacknowledged (checked inside the same script as the XADD, so the bound holds with many
  producers) and waits, raising :class:`QueueFullError` after ``backpressure_timeout_s``.
  Acknowledged entries are deleted from the stream, so the backlog is the stream's length.
- Staleness: :meth:`take_groups` given the learner's ``current_version`` drops groups whose
  policy version is below ``current_version - max_policy_lag`` (acknowledged, counted as
  ``dropped_stale``, never returned).

Single Redis instance only: the scripts touch image keys they compute themselves (not Redis
Cluster safe).
"""

from axpo.queue.entries import (
    Delivery,
    PromptDelivery,
    PromptTask,
    QueueCounters,
    QueueFullError,
)
from axpo.queue.trajectory import TrajectoryQueue, connect

__all__ = [
    "Delivery",
    "PromptDelivery",
    "PromptTask",
    "QueueCounters",
    "QueueFullError",
    "TrajectoryQueue",
    "connect",
]
