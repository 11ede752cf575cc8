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
  crash of Redis (``axpo.redis_server``).
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

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from google.protobuf.message import DecodeError

from axpo import domain as d
from axpo.config import QueueSettings
from axpo.convert import group_from_proto, group_to_proto
from axpo.logs import get_logger, log_event
from axpo.v1 import common_pb2 as pb

if TYPE_CHECKING:
    from axpo.redis_server import RedisServer

__all__ = [
    "Delivery",
    "PromptDelivery",
    "PromptTask",
    "QueueCounters",
    "QueueFullError",
    "TrajectoryQueue",
    "connect",
]

_log = get_logger(__name__)

# Field names of stream entries (bytes, as redis-py returns them).
F_GROUP = b"group"
F_IMAGES = b"images"
F_VERSION = b"version"
F_TASK = b"task"

# KEYS: stream, stats, image keys...  ARGV: max_backlog, ttl_s, payload, shas csv, version,
# then one data blob per image key. Returns the entry id, or false when the backlog is full.
_PUT_GROUP = """
local max = tonumber(ARGV[1])
if max > 0 and redis.call('XLEN', KEYS[1]) >= max then return false end
for i = 3, #KEYS do
  redis.call('HSETNX', KEYS[i], 'data', ARGV[3 + i])
  redis.call('HINCRBY', KEYS[i], 'refs', 1)
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'produced', 1)
return redis.call('XADD', KEYS[1], '*', 'group', ARGV[3], 'images', ARGV[4], 'version', ARGV[5])
"""

# KEYS: stream, stats, dead stream.  ARGV: consumer group, counter field, image key prefix,
# reason ('' = not a dead letter), dead maxlen, consumer name, ids...
# For each id still pending: XACK, release its images, copy it to the dead stream when a reason
# is given, XDEL. Ids no longer pending are ignored (acks are idempotent). Returns the count.
_RELEASE = """
local released = 0
for i = 7, #ARGV do
  local id = ARGV[i]
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    released = released + 1
    if #entry == 1 then
      local fields = entry[1][2]
      for j = 1, #fields, 2 do
        if fields[j] == 'images' and fields[j + 1] ~= '' then
          for sha in string.gmatch(fields[j + 1], '[^,]+') do
            local key = ARGV[3] .. sha
            if redis.call('HINCRBY', key, 'refs', -1) <= 0 then redis.call('DEL', key) end
          end
        end
      end
      if ARGV[4] ~= '' then
        local args = {'XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'source', KEYS[1],
                      'entry_id', id, 'reason', ARGV[4], 'consumer', ARGV[6]}
        for j = 1, #fields do args[#args + 1] = fields[j] end
        redis.call(unpack(args))
      end
    end
    redis.call('XDEL', KEYS[1], id)
  end
end
if released > 0 and ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[2], released) end
return released
"""


class QueueFullError(TimeoutError):
    """A producer waited longer than ``backpressure_timeout_s`` for the learner to catch up."""


@dataclass(frozen=True)
class PromptTask:
    """One work item for a rollout worker (stored as JSON, see the module docstring)."""

    task_id: str
    question_id: str
    policy_version: int = 0
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "task_id": self.task_id,
                "question_id": self.question_id,
                "policy_version": self.policy_version,
                "data": dict(self.data),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PromptTask:
        """Raises ValueError naming what is wrong."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"prompt task is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ValueError("prompt task is not a JSON object")
        task_id, question_id = obj.get("task_id"), obj.get("question_id")
        version, data = obj.get("policy_version", 0), obj.get("data", {})
        if not isinstance(task_id, str) or not isinstance(question_id, str):
            raise ValueError("prompt task needs string task_id and question_id")
        if not isinstance(version, int) or not isinstance(data, dict):
            raise ValueError("prompt task: policy_version must be an int and data an object")
        return cls(task_id, question_id, version, data)


@dataclass(frozen=True)
class Delivery:
    """A group taken from the queue, images re-attached. Acknowledge ``entry_id`` once the
    effect of training on it is durable."""

    entry_id: str
    group: d.Group


@dataclass(frozen=True)
class PromptDelivery:
    entry_id: str
    task: PromptTask


@dataclass(frozen=True)
class QueueCounters:
    """Totals of a job's queue, kept in Redis (they survive restarts of every process)."""

    produced: int = 0
    """Groups added."""
    consumed: int = 0
    """Groups acknowledged by the learner (trained and checkpointed)."""
    dropped_stale: int = 0
    """Groups dropped for exceeding ``max_policy_lag``."""
    dead_lettered: int = 0
    """Groups moved to the dead-letter stream."""
    reclaimed: int = 0
    """Group deliveries taken over from idle consumers."""
    prompts_produced: int = 0
    """Prompt tasks added."""
    prompts_done: int = 0
    """Prompt tasks acknowledged."""
    prompts_dead_lettered: int = 0
    """Prompt tasks moved to the dead-letter stream."""


def _any(value: object) -> Any:
    """redis-py annotates replies as ``Awaitable | Any``; this client is synchronous."""
    return value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def connect(settings: QueueSettings) -> tuple[redis.Redis, RedisServer | None]:
    """A client for ``settings.redis_url``, or for a private server started here.

    Returns ``(client, server)``; ``server`` is the :class:`axpo.redis_server.RedisServer` to
    ``stop()`` at exit, or None when an external Redis is used.
    """
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url), None
    from axpo.redis_server import RedisServer

    server = RedisServer(settings.embedded_dir, fsync=settings.embedded_fsync)
    server.start()
    return server.client(), server


class TrajectoryQueue:
    """The queues of one job. Thread-compatible, not thread-safe: one instance per thread.

    ``client`` must return bytes (``decode_responses=False``, redis-py's default).
    """

    def __init__(self, client: redis.Redis, job_id: str, settings: QueueSettings) -> None:
        if not job_id or any(c.isspace() or c == ":" for c in job_id):
            raise ValueError(f"job id {job_id!r}: must be non-empty without spaces or ':'")
        self.client = client
        self.job_id = job_id
        self.settings = settings
        base = f"{settings.key_prefix}:{job_id}"
        self.prompts_key = f"{base}:prompts"
        self.groups_key = f"{base}:groups"
        self.dead_key = f"{base}:dead"
        self.stats_key = f"{base}:stats"
        self.image_prefix = f"{settings.key_prefix}:img:"
        self._put_script = client.register_script(_PUT_GROUP)
        self._release_script = client.register_script(_RELEASE)
        # Per (stream, consumer): where re-reading its own pending entries stands; "" = done.
        self._pending_cursor: dict[tuple[str, str], str] = {}
        self.ensure()

    # ----------------------------------------------------------------------- setup

    def ensure(self) -> None:
        """Create both streams and their consumer groups if missing (idempotent)."""
        for key, group in (
            (self.prompts_key, self.settings.prompts_consumer_group),
            (self.groups_key, self.settings.groups_consumer_group),
        ):
            try:
                # From id 0, so entries added before the group existed are consumed too.
                self.client.xgroup_create(key, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def image_key(self, sha256: str) -> str:
        return self.image_prefix + sha256

    # ----------------------------------------------------------------------- groups

    def put_group(self, group: d.Group, *, timeout_s: float | None = None) -> str:
        """Add a finished group; returns its entry id.

        Waits while ``max_backlog`` groups are unacknowledged; raises QueueFullError after
        ``timeout_s`` (default ``backpressure_timeout_s``). Raises ValueError for a group that
        would be dead-lettered anyway (an image without bytes or with a wrong hash, a
        trajectory referencing an image the group lacks): that is the producer's bug.
        """
        images = self._check_outgoing(group)
        msg = group_to_proto(group)
        for img in msg.images:
            img.ClearField("data")
        payload = msg.SerializeToString()
        keys = [self.groups_key, self.stats_key, *(self.image_key(i.sha256) for i in images)]
        args: list[bytes | str | int] = [
            self.settings.max_backlog,
            self.settings.image_ttl_s,
            payload,
            ",".join(i.sha256 for i in images),
            group.policy_version,
            *(i.data for i in images),
        ]
        timeout = self.settings.backpressure_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            entry_id = _any(self._put_script(keys=keys, args=args))
            if entry_id is not None:
                if waited:
                    log_event(_log, 10, "backpressure released", job=self.job_id)
                return _text(entry_id)
            if not waited:
                log_event(
                    _log, 10, "backpressure", job=self.job_id, max_backlog=self.settings.max_backlog
                )
                waited = True
            self._wait_for_room(deadline, timeout)

    def _wait_for_room(self, deadline: float, timeout: float) -> None:
        delay = 0.005
        while True:
            backlog = self.backlog()
            if backlog < self.settings.max_backlog:
                return
            if time.monotonic() >= deadline:
                raise QueueFullError(
                    f"job {self.job_id}: the learner is {backlog} groups behind "
                    f"(max_backlog {self.settings.max_backlog}) and did not catch up within "
                    f"{timeout:g} s; is the learner running and acknowledging?"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)

    @staticmethod
    def _check_outgoing(group: d.Group) -> list[d.Image]:
        seen: dict[str, d.Image] = {}
        for img in group.images:
            if not img.data:
                raise ValueError(f"group {group.group_id}: image {img.sha256} has no bytes")
            if hashlib.sha256(img.data).hexdigest() != img.sha256:
                raise ValueError(f"group {group.group_id}: image bytes do not match {img.sha256}")
            seen.setdefault(img.sha256, img)
        for traj in group.trajectories:
            for sha in traj.image_sha256:
                if sha not in seen:
                    raise ValueError(
                        f"group {group.group_id}: trajectory {traj.trajectory_id} references "
                        f"image {sha} the group does not carry"
                    )
        return list(seen.values())

    def take_groups(
        self,
        consumer: str,
        count: int = 16,
        block_ms: int | None = None,
        *,
        current_version: int | None = None,
    ) -> list[Delivery]:
        """Up to ``count`` groups for ``consumer``: first its own unacknowledged entries from
        an earlier life, then new ones (waiting up to ``block_ms`` for them).

        Bad entries are dead-lettered and stale ones dropped here (both acknowledged), so the
        list may be shorter than what Redis returned, even empty.
        """
        entries = self._read(
            self.groups_key, self.settings.groups_consumer_group, consumer, count, block_ms
        )
        return self._deliver_groups(consumer, entries, current_version)

    def reclaim(
        self,
        consumer: str,
        min_idle_ms: int | None = None,
        *,
        count: int = 100,
        current_version: int | None = None,
    ) -> list[Delivery]:
        """Take over groups delivered to other consumers and unacknowledged for
        ``min_idle_ms`` (default ``claim_idle_ms``): those consumers are presumed dead."""
        group = self.settings.groups_consumer_group
        entries = self._autoclaim(self.groups_key, group, consumer, min_idle_ms, count)
        if entries:
            self.client.hincrby(self.stats_key, "reclaimed", len(entries))
            log_event(_log, 20, "reclaimed", job=self.job_id, consumer=consumer, n=len(entries))
        kept = []
        for entry_id, fields in entries:
            delivered = self._times_delivered(self.groups_key, group, entry_id)
            if delivered > self.settings.max_deliveries:
                reason = (
                    f"delivered {delivered} times without an ack (max_deliveries "
                    f"{self.settings.max_deliveries}): poison message"
                )
                self._release(
                    self.groups_key,
                    group,
                    [entry_id],
                    "dead_lettered",
                    reason=reason,
                    consumer=consumer,
                )
                log_event(_log, 30, "dead letter", job=self.job_id, entry=entry_id, reason=reason)
            else:
                kept.append((entry_id, fields))
        return self._deliver_groups(consumer, kept, current_version)

    def _times_delivered(self, key: str, group: str, entry_id: str) -> int:
        rows = _any(self.client.xpending_range(key, group, min=entry_id, max=entry_id, count=1))
        return int(rows[0]["times_delivered"]) if rows else 0

    def ack_groups(self, entry_ids: Iterable[str]) -> int:
        """Acknowledge groups whose effect is durable (for the learner: the checkpoint that
        includes the step which consumed them is written). Idempotent; returns how many were
        still pending."""
        return self._release(
            self.groups_key, self.settings.groups_consumer_group, list(entry_ids), "consumed"
        )

    def dead_letter_groups(self, consumer: str, entry_ids: Iterable[str], reason: str) -> int:
        """Move groups ``consumer`` holds to the dead-letter stream with ``reason`` (for the
        learner: groups it cannot train on) and acknowledge them, counted in
        ``dead_lettered``. Idempotent; returns how many were still pending."""
        if not reason:
            raise ValueError("a dead letter needs a reason")
        ids = list(entry_ids)
        released = self._release(
            self.groups_key,
            self.settings.groups_consumer_group,
            ids,
            "dead_lettered",
            reason=reason,
            consumer=consumer,
        )
        for entry_id in ids:
            log_event(_log, 30, "dead letter", job=self.job_id, entry=entry_id, reason=reason)
        return released

    def touch_groups(self, consumer: str, entry_ids: Iterable[str]) -> int:
        """Reset the idle time of groups ``consumer`` holds (taken, not yet acknowledged), so
        that :meth:`reclaim` (by another consumer, or by this one) does not take them while
        they are in use. Does not count as a delivery (XCLAIM JUSTID); ids no longer pending
        are ignored. Returns how many were touched."""
        ids: list[Any] = list(entry_ids)
        if not ids:
            return 0
        reply = _any(
            self.client.xclaim(
                self.groups_key,
                self.settings.groups_consumer_group,
                consumer,
                0,
                ids,
                justid=True,
            )
        )
        return len(reply)

    def backlog(self) -> int:
        """Groups not yet acknowledged: queued plus taken-but-unacknowledged."""
        return int(_any(self.client.xlen(self.groups_key)))

    def pending(self) -> int:
        """Groups taken but not yet acknowledged."""
        info = _any(self.client.xpending(self.groups_key, self.settings.groups_consumer_group))
        return int(info["pending"])

    def _deliver_groups(
        self,
        consumer: str,
        entries: list[tuple[str, dict[bytes, bytes] | None]],
        current_version: int | None,
    ) -> list[Delivery]:
        lag = self.settings.max_policy_lag
        decoded: list[tuple[str, pb.Group]] = []
        stale: list[str] = []
        dead: list[tuple[str, str]] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending: only possible outside this API
                stale.append(entry_id)
                continue
            payload = fields.get(F_GROUP)
            if payload is None:
                dead.append((entry_id, "entry has no 'group' field"))
                continue
            try:
                msg = pb.Group.FromString(payload)
            except DecodeError as exc:
                dead.append((entry_id, f"undecodable axpo.v1.Group: {exc}"))
                continue
            if current_version is not None and msg.policy_version < current_version - lag:
                stale.append(entry_id)
                continue
            decoded.append((entry_id, msg))

        blobs = self._fetch_images({i.sha256 for _, m in decoded for i in m.images})
        out: list[Delivery] = []
        for entry_id, msg in decoded:
            try:
                out.append(Delivery(entry_id, self._attach_and_convert(msg, blobs)))
            except ValueError as exc:
                dead.append((entry_id, str(exc)))

        for entry_id, reason in dead:
            self._release(
                self.groups_key,
                self.settings.groups_consumer_group,
                [entry_id],
                "dead_lettered",
                reason=reason,
                consumer=consumer,
            )
            log_event(_log, 30, "dead letter", job=self.job_id, entry=entry_id, reason=reason)
        if stale:
            self._release(
                self.groups_key, self.settings.groups_consumer_group, stale, "dropped_stale"
            )
        return out

    def _fetch_images(self, shas: set[str]) -> dict[str, bytes | None]:
        if not shas:
            return {}
        ordered = sorted(shas)
        pipe = self.client.pipeline(transaction=False)
        for sha in ordered:
            pipe.hget(self.image_key(sha), "data")
            pipe.expire(self.image_key(sha), self.settings.image_ttl_s)
        replies = pipe.execute()
        return {sha: replies[2 * i] for i, sha in enumerate(ordered)}

    @staticmethod
    def _attach_and_convert(msg: pb.Group, blobs: Mapping[str, bytes | None]) -> d.Group:
        for img in msg.images:
            data = blobs.get(img.sha256)
            if data is None:
                raise ValueError(f"image {img.sha256} is missing (expired or never stored)")
            if hashlib.sha256(data).hexdigest() != img.sha256:
                raise ValueError(f"image {img.sha256}: stored bytes do not match the hash")
            img.data = data
        group = group_from_proto(msg)  # validates every trajectory (ValueError names it)
        carried = {i.sha256 for i in group.images}
        for traj in group.trajectories:
            for sha in traj.image_sha256:
                if sha not in carried:
                    raise ValueError(
                        f"trajectory {traj.trajectory_id} references image {sha} "
                        "the group does not carry"
                    )
        return group

    # ----------------------------------------------------------------------- prompts

    def put_prompts(self, tasks: Sequence[PromptTask]) -> list[str]:
        """Add work items for rollout workers (one pipelined round trip); returns entry ids."""
        if not tasks:
            return []
        pipe = self.client.pipeline(transaction=True)
        for task in tasks:
            pipe.xadd(self.prompts_key, {F_TASK: task.to_json()})
        pipe.hincrby(self.stats_key, "prompts_produced", len(tasks))
        replies = pipe.execute()
        return [_text(r) for r in replies[: len(tasks)]]

    def take_prompts(
        self, consumer: str, count: int = 1, block_ms: int | None = None
    ) -> list[PromptDelivery]:
        """Up to ``count`` prompt tasks for ``consumer`` (its own unacknowledged ones first)."""
        entries = self._read(
            self.prompts_key, self.settings.prompts_consumer_group, consumer, count, block_ms
        )
        return self._deliver_prompts(consumer, entries)

    def reclaim_prompts(
        self, consumer: str, min_idle_ms: int | None = None, *, count: int = 100
    ) -> list[PromptDelivery]:
        """Take over prompt tasks of rollout workers idle for ``min_idle_ms``."""
        entries = self._autoclaim(
            self.prompts_key, self.settings.prompts_consumer_group, consumer, min_idle_ms, count
        )
        return self._deliver_prompts(consumer, entries)

    def ack_prompts(self, entry_ids: Iterable[str]) -> int:
        """Acknowledge prompt tasks whose group was put (call after :meth:`put_group`)."""
        return self._release(
            self.prompts_key, self.settings.prompts_consumer_group, list(entry_ids), "prompts_done"
        )

    def dead_letter_prompts(self, consumer: str, entry_ids: Iterable[str], reason: str) -> int:
        """Move prompt tasks ``consumer`` holds to the dead-letter stream with ``reason`` (a
        question that cannot be sampled) and acknowledge them, counted in
        ``prompts_dead_lettered``. Idempotent; returns how many were still pending."""
        if not reason:
            raise ValueError("a dead letter needs a reason")
        ids = list(entry_ids)
        released = self._release(
            self.prompts_key,
            self.settings.prompts_consumer_group,
            ids,
            "prompts_dead_lettered",
            reason=reason,
            consumer=consumer,
        )
        for entry_id in ids:
            log_event(_log, 30, "dead letter", job=self.job_id, entry=entry_id, reason=reason)
        return released

    def prompt_backlog(self) -> int:
        """Prompt tasks not yet acknowledged."""
        return int(_any(self.client.xlen(self.prompts_key)))

    def _deliver_prompts(
        self, consumer: str, entries: list[tuple[str, dict[bytes, bytes] | None]]
    ) -> list[PromptDelivery]:
        out: list[PromptDelivery] = []
        for entry_id, fields in entries:
            try:
                if fields is None or F_TASK not in fields:
                    raise ValueError("entry has no 'task' field")
                out.append(PromptDelivery(entry_id, PromptTask.from_json(fields[F_TASK])))
            except ValueError as exc:
                self._release(
                    self.prompts_key,
                    self.settings.prompts_consumer_group,
                    [entry_id],
                    "prompts_dead_lettered",
                    reason=str(exc),
                    consumer=consumer,
                )
                log_event(_log, 30, "dead letter", job=self.job_id, entry=entry_id, reason=str(exc))
        return out

    # ----------------------------------------------------------------------- shared

    def _read(
        self, key: str, group: str, consumer: str, count: int, block_ms: int | None
    ) -> list[tuple[str, dict[bytes, bytes] | None]]:
        cursor_key = (key, consumer)
        cursor = self._pending_cursor.get(cursor_key, "0")
        if cursor:
            # Own pending entries first (delivered in an earlier life, never acknowledged),
            # paged by id; an empty page means they are all re-delivered.
            reply = _any(self.client.xreadgroup(group, consumer, {key: cursor}, count=count))
            entries = self._entries(reply)
            if entries:
                self._pending_cursor[cursor_key] = entries[-1][0]
                return entries
            self._pending_cursor[cursor_key] = ""
        block = self.settings.block_ms if block_ms is None else block_ms
        try:
            reply = _any(
                self.client.xreadgroup(
                    group, consumer, {key: ">"}, count=count, block=block or None
                )
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the stream (a server without persistence restarted): recreate it.
            self.ensure()
            return []
        return self._entries(reply)

    @staticmethod
    def _entries(reply: Any) -> list[tuple[str, dict[bytes, bytes] | None]]:
        out: list[tuple[str, dict[bytes, bytes] | None]] = []
        if not reply:
            return out
        streams = reply.values() if isinstance(reply, dict) else (s[1] for s in reply)
        for stream_entries in streams:
            # RESP3 dicts may nest one more list level.
            for item in stream_entries:
                entry_id, fields = item[0], item[1]
                out.append((_text(entry_id), dict(fields) if fields is not None else None))
        return out

    def _autoclaim(
        self, key: str, group: str, consumer: str, min_idle_ms: int | None, count: int
    ) -> list[tuple[str, dict[bytes, bytes] | None]]:
        idle = self.settings.claim_idle_ms if min_idle_ms is None else min_idle_ms
        out: list[tuple[str, dict[bytes, bytes] | None]] = []
        cursor: str = "0-0"
        while len(out) < count:
            reply = _any(
                self.client.xautoclaim(key, group, consumer, idle, cursor, count=count - len(out))
            )
            for item in reply[1]:
                if item is None:
                    continue
                entry_id, fields = item
                out.append((_text(entry_id), dict(fields) if fields is not None else None))
            cursor = _text(reply[0])
            if cursor == "0-0":
                break
        return out

    def _release(
        self,
        key: str,
        group: str,
        ids: list[str],
        counter: str,
        *,
        reason: str = "",
        consumer: str = "",
    ) -> int:
        if not ids:
            return 0
        released = _any(
            self._release_script(
                keys=[key, self.stats_key, self.dead_key],
                args=[
                    group,
                    counter,
                    self.image_prefix,
                    reason,
                    self.settings.dead_letter_maxlen,
                    consumer,
                    *ids,
                ],
            )
        )
        return int(released)

    # ----------------------------------------------------------------------- reading state

    def counters(self) -> QueueCounters:
        raw = _any(self.client.hgetall(self.stats_key))
        values = {_text(k): int(v) for k, v in raw.items()}
        known = QueueCounters.__dataclass_fields__
        return QueueCounters(**{k: v for k, v in values.items() if k in known})

    def dead_letters(self, count: int = 100) -> list[dict[str, bytes]]:
        """The newest dead letters (fields as bytes: source, entry_id, reason, consumer, and
        the original entry's fields)."""
        reply = _any(self.client.xrevrange(self.dead_key, count=count))
        return [{_text(k): v for k, v in fields.items()} for _, fields in reply]
