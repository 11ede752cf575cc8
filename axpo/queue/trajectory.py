"""The trajectory queue's client, :class:`TrajectoryQueue` (the contract it keeps is in the
package docstring, :mod:`axpo.queue`), and :func:`connect`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
from google.protobuf.message import DecodeError

from axpo.contracts import domain as d
from axpo.contracts.convert import group_from_proto, group_to_proto
from axpo.queue.entries import (
    F_GROUP,
    F_TASK,
    Delivery,
    PromptDelivery,
    PromptTask,
    QueueCounters,
    QueueFullError,
)
from axpo.queue.scripts import PUT_GROUP, RELEASE
from axpo.settings.queue import QueueSettings
from axpo.telemetry.logs import get_logger, log_event
from axpo.v1 import common_pb2 as pb

if TYPE_CHECKING:
    from axpo.queue.redis_server import RedisServer

_log = get_logger(__name__)


def _any(value: object) -> Any:
    """redis-py annotates replies as ``Awaitable | Any``; this client is synchronous."""
    return value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def connect(settings: QueueSettings) -> tuple[redis.Redis, RedisServer | None]:
    """A client for ``settings.redis_url``, or for a private server started here.

    Returns ``(client, server)``; ``server`` is the :class:`axpo.queue.redis_server.RedisServer` to
    ``stop()`` at exit, or None when an external Redis is used.
    """
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url), None
    from axpo.queue.redis_server import RedisServer

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
        self._put_script = client.register_script(PUT_GROUP)
        self._release_script = client.register_script(RELEASE)
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
        min_version: int | None = None,
    ) -> list[Delivery]:
        """Up to ``count`` groups for ``consumer``: first its own unacknowledged entries from
        an earlier life, then new ones (waiting up to ``block_ms`` for them).

        Bad entries are dead-lettered and stale ones dropped here (both acknowledged), so the
        list may be shorter than what Redis returned, even empty. Stale: sampled more than
        ``max_policy_lag`` versions before ``current_version``, or before ``min_version`` (a
        deployment's job: the versions before the job's first weights are another job's).
        """
        entries = self._read(
            self.groups_key, self.settings.groups_consumer_group, consumer, count, block_ms
        )
        return self._deliver_groups(consumer, entries, current_version, min_version)

    def reclaim(
        self,
        consumer: str,
        min_idle_ms: int | None = None,
        *,
        count: int = 100,
        current_version: int | None = None,
        min_version: int | None = None,
    ) -> list[Delivery]:
        """Take over groups delivered to other consumers and unacknowledged for
        ``min_idle_ms`` (default ``claim_idle_ms``): those consumers are presumed dead.
        Stale ones are dropped as by :meth:`take_groups`."""
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
        return self._deliver_groups(consumer, kept, current_version, min_version)

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
        min_version: int | None = None,
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
            if (current_version is not None and msg.policy_version < current_version - lag) or (
                min_version is not None and msg.policy_version < min_version
            ):
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
