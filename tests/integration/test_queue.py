"""The trajectory queue against a real private redis-server: images stored once, ack and
reclaim semantics, dead letters, staleness, backpressure, and crashes of Redis and of a
consumer (kill -9) with every group consumed exactly once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from axpo.contracts import domain as d
from axpo.contracts.convert import group_to_proto
from axpo.queue import PromptTask, QueueFullError, TrajectoryQueue
from axpo.queue.entries import F_GROUP, F_IMAGES, F_TASK, F_VERSION
from axpo.queue.redis_server import RedisServer, find_redis_server
from axpo.settings.queue import QueueSettings
from tests.integration import redis_fixtures
from tests.integration.redis_fixtures import make_group, make_image, new_job_id

# The fixtures this module uses (a real private redis-server; see redis_fixtures.py).
redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client
fresh_redis_server = redis_fixtures.fresh_redis_server

pytestmark = pytest.mark.integration


def _queue(client, **overrides) -> TrajectoryQueue:
    # A prefix of its own, so the (shared, content-addressed) image keys are the test's alone.
    settings = QueueSettings(block_ms=50, key_prefix=new_job_id(), **overrides)
    return TrajectoryQueue(client, new_job_id(), settings)


def _image_keys(client, q: TrajectoryQueue) -> list[bytes]:
    return list(client.scan_iter(match=q.image_prefix + "*"))


def _drain(q: TrajectoryQueue, consumer: str, **kw) -> list:
    out = []
    while batch := q.take_groups(consumer, count=8, block_ms=10, **kw):
        out += batch
    return out


def test_server_binary_is_found_and_private():
    assert find_redis_server().is_file()
    server = RedisServer()
    server.start()
    directory = server.directory
    try:
        assert server.client().config_get("appendfsync") == {"appendfsync": "always"}
    finally:
        server.stop()
    assert not directory.exists()


def test_round_trip_stores_each_image_once_and_releases_it(redis_client):
    q = _queue(redis_client)
    shared, other = make_image(1), make_image(2)
    groups = [make_group(f"g{i}", image=shared, job_id=q.job_id) for i in range(3)]
    groups.append(make_group("g3", image=other))
    ids = [q.put_group(g) for g in groups]
    assert len(_image_keys(redis_client, q)) == 2
    assert q.backlog() == 4

    got = _drain(q, "learner-0")
    assert [x.entry_id for x in got] == ids
    assert [x.group for x in got] == groups  # images re-attached, trajectories intact
    assert q.pending() == 4

    assert q.ack_groups(ids[:3]) == 3
    assert len(_image_keys(redis_client, q)) == 1  # the shared image had no more users
    assert q.ack_groups(ids) == 1  # idempotent: acked ids are ignored
    assert _image_keys(redis_client, q) == []
    assert q.backlog() == 0
    c = q.counters()
    assert (c.produced, c.consumed, c.dead_lettered) == (4, 4, 0)


def test_unacked_entries_come_back_to_the_same_consumer_after_a_restart(redis_client):
    q = _queue(redis_client)
    ids = [q.put_group(make_group(f"g{i}")) for i in range(5)]
    first = q.take_groups("learner-0", count=3)
    q.ack_groups([first[0].entry_id])
    # A new process with the same consumer name: its pending entries come first.
    q2 = TrajectoryQueue(redis_client, q.job_id, q.settings)
    again = q2.take_groups("learner-0", count=10)
    assert [x.entry_id for x in again] == ids[1:3]
    assert [x.entry_id for x in q2.take_groups("learner-0", count=10)] == ids[3:]
    assert q2.take_groups("learner-0", count=10, block_ms=10) == []


def test_entries_of_an_idle_consumer_are_reclaimed(redis_client):
    q = _queue(redis_client)
    ids = [q.put_group(make_group(f"g{i}")) for i in range(3)]
    assert len(q.take_groups("dead-one", count=2)) == 2
    assert q.reclaim("survivor", min_idle_ms=10_000) == []  # not idle long enough
    time.sleep(0.06)
    got = q.reclaim("survivor", min_idle_ms=50)
    assert [x.entry_id for x in got] == ids[:2]
    assert q.counters().reclaimed == 2
    assert q.ack_groups(ids[:2]) == 2
    assert q.ack_groups(ids[:2]) == 0  # the dead consumer's late ack is harmless


def test_a_poison_group_is_dead_lettered_after_max_deliveries(redis_client):
    q = _queue(redis_client, max_deliveries=3)
    poison, fine = q.put_group(make_group("poison")), q.put_group(make_group("fine"))
    assert [d.entry_id for d in q.take_groups("c0", count=1)] == [poison]  # delivery 1
    for i in range(1, 3):  # each consumer "dies" holding it: deliveries 2 and 3
        time.sleep(0.02)
        assert [d.entry_id for d in q.reclaim(f"c{i}", min_idle_ms=10)] == [poison]
    time.sleep(0.02)
    assert q.reclaim("c3", min_idle_ms=10) == []  # delivery 4 > 3: dead-lettered instead
    (letter,) = q.dead_letters()
    assert letter["entry_id"].decode() == poison
    assert b"poison message" in letter["reason"]
    assert q.counters().dead_lettered == 1
    assert [d.entry_id for d in q.take_groups("c3", count=5)] == [fine]  # the stream flows


def test_bad_entries_go_to_the_dead_letter_stream_with_a_reason(redis_client):
    q = _queue(redis_client)
    image = make_image(3)
    good_before = q.put_group(make_group("ok1", image=image))
    redis_client.xadd(q.groups_key, {F_GROUP: b"\xff\xff\xff\xff", F_IMAGES: b"", F_VERSION: 0})
    redis_client.xadd(q.groups_key, {b"other": b"x"})
    bad = make_group("bad")
    broken = group_to_proto(bad)
    del broken.trajectories[1].logprobs[-1]  # lengths disagree
    redis_client.xadd(q.groups_key, {F_GROUP: broken.SerializeToString(), F_IMAGES: b""})
    lost = make_image(4)
    q.put_group(make_group("lost", image=lost))
    redis_client.delete(q.image_key(lost.sha256))
    good_after = q.put_group(make_group("ok2", image=image))

    got = _drain(q, "learner-0")
    assert [x.entry_id for x in got] == [good_before, good_after]
    reasons = [dl["reason"].decode() for dl in reversed(q.dead_letters())]
    assert len(reasons) == 4
    assert "undecodable axpo.v1.Group" in reasons[0]
    assert "no 'group' field" in reasons[1]
    assert "logprobs has 15 entries, token_ids has 16" in reasons[2]
    assert f"image {lost.sha256} is missing" in reasons[3]
    assert q.dead_letters()[0][F_GROUP.decode()]  # the original payload is kept
    assert q.counters().dead_lettered == 4
    assert q.pending() == 2  # only the good ones wait for their ack


def test_stale_groups_are_dropped_and_counted(redis_client):
    q = _queue(redis_client, max_policy_lag=4)
    for v in (0, 5, 6, 10):
        q.put_group(make_group(f"v{v}", version=v, image=make_image(v)))
    got = _drain(q, "learner-0", current_version=10)
    assert [x.group.policy_version for x in got] == [6, 10]
    assert q.counters().dropped_stale == 2
    assert len(_image_keys(redis_client, q)) == 2  # the dropped groups' images are released


def test_groups_below_a_jobs_first_version_are_dropped_by_take_and_reclaim(redis_client):
    # A deployment's job starts at the version its first weights were published at; groups
    # sampled with an earlier job's weights are within max_policy_lag but must not be trained.
    q = _queue(redis_client, max_policy_lag=4, claim_idle_ms=1)
    for v in (7, 8, 9):
        q.put_group(make_group(f"v{v}", version=v, image=make_image(v)))
    got = _drain(q, "learner-0", current_version=9, min_version=8)
    assert [x.group.policy_version for x in got] == [8, 9]
    assert q.counters().dropped_stale == 1
    q.ack_groups([x.entry_id for x in got])
    q.put_group(make_group("v7-late", version=7, image=make_image(70)))
    q.put_group(make_group("v9-late", version=9, image=make_image(90)))
    assert q.take_groups("dead-worker", count=8, block_ms=10) != []  # delivered, never acked
    time.sleep(0.01)
    reclaimed = q.reclaim("learner-0", current_version=9, min_version=8)
    assert [x.group.group_id for x in reclaimed] == ["v9-late"]
    assert q.counters().dropped_stale == 2


def test_backpressure_waits_for_the_learner_and_times_out_clearly(redis_client):
    q = _queue(redis_client, max_backlog=2)
    q.put_group(make_group("a"))
    q.put_group(make_group("b"))
    with pytest.raises(QueueFullError, match=r"2 groups behind \(max_backlog 2\)"):
        q.put_group(make_group("c"), timeout_s=0.2)

    done: list[str] = []
    producer = threading.Thread(
        target=lambda: done.append(
            TrajectoryQueue(redis_client, q.job_id, q.settings).put_group(
                make_group("c"), timeout_s=10
            )
        )
    )
    producer.start()
    time.sleep(0.3)
    assert not done  # still waiting: taking alone does not free room, acknowledging does
    taken = q.take_groups("learner-0", count=1)
    time.sleep(0.1)
    assert not done
    q.ack_groups([taken[0].entry_id])
    producer.join(5)
    assert done
    assert q.backlog() == 2


def test_prompts_round_trip_and_bad_json_is_dead_lettered(redis_client):
    q = _queue(redis_client)
    tasks = [PromptTask(f"t{i}", f"q{i}", 3, {"item": i}) for i in range(3)]
    ids = q.put_prompts(tasks)
    redis_client.xadd(q.prompts_key, {F_TASK: b"{not json"})
    got = q.take_prompts("worker-0", count=10)
    assert [x.task for x in got] == tasks
    assert q.ack_prompts(ids) == 3
    assert q.prompt_backlog() == 0
    c = q.counters()
    assert (c.prompts_produced, c.prompts_done, c.prompts_dead_lettered) == (3, 3, 1)
    assert "not JSON" in q.dead_letters(1)[0]["reason"].decode()


def test_redis_killed_mid_run_loses_nothing_and_redelivers_no_acked_entry(
    fresh_redis_server: RedisServer,
):
    server = fresh_redis_server
    client = server.client()
    q = TrajectoryQueue(client, new_job_id(), QueueSettings(block_ms=20))
    ids = {q.put_group(make_group(f"g{i}", image=make_image(i % 3))): f"g{i}" for i in range(30)}
    taken = q.take_groups("learner-0", count=12)
    acked = [x.entry_id for x in taken[:7]]
    q.ack_groups(acked)

    server.kill()  # SIGKILL: no shutdown flush
    server.restart()
    client2 = server.client()
    q2 = TrajectoryQueue(client2, q.job_id, q.settings)
    after: list[str] = []
    while batch := q2.take_groups("learner-0", count=8, block_ms=20):
        after += [x.entry_id for x in batch]
        q2.ack_groups([x.entry_id for x in batch])

    assert not set(acked) & set(after)
    assert sorted(acked + after) == sorted(ids)  # every group exactly once
    assert after[:5] == [x.entry_id for x in taken[7:]]  # the unacked ones came back first
    assert q2.counters().consumed == 30
    assert list(client2.scan_iter(match=q2.image_prefix + "*")) == []
    client.close()
    client2.close()


_DOOMED_CONSUMER = """
import sys, time, redis
from axpo.contracts import domain as d
from axpo.settings.queue import QueueSettings
from axpo.queue import TrajectoryQueue
settings = QueueSettings.model_validate_json(sys.argv[3])
q = TrajectoryQueue(redis.Redis.from_url(sys.argv[1]), sys.argv[2], settings)
print(",".join(x.entry_id for x in q.take_groups("doomed", count=4)), flush=True)
time.sleep(60)
"""


def test_a_consumer_killed_before_acking_has_its_entries_reclaimed_once(redis_server, redis_client):
    q = _queue(redis_client)
    ids = [q.put_group(make_group(f"g{i}", image=make_image(7))) for i in range(10)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _DOOMED_CONSUMER,
            redis_server.url,
            q.job_id,
            q.settings.model_dump_json(),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
    finally:
        proc.kill()  # SIGKILL between take and ack
        proc.wait()
        proc.stdout.close()
    doomed = line.split(",")
    assert doomed == ids[:4]

    processed = [x.entry_id for x in _drain(q, "survivor")]
    assert q.ack_groups(processed) == 6
    time.sleep(0.06)
    reclaimed = [x.entry_id for x in q.reclaim("survivor", min_idle_ms=50)]
    assert q.ack_groups(reclaimed) == 4
    processed += reclaimed
    assert reclaimed == doomed
    assert sorted(processed) == sorted(ids)
    assert q.reclaim("survivor", min_idle_ms=0) == []
    assert q.backlog() == 0
    assert _image_keys(redis_client, q) == []


def test_put_group_refuses_what_would_be_dead_lettered(redis_client):
    q = _queue(redis_client)
    image = make_image(9)
    with pytest.raises(ValueError, match="has no bytes"):
        q.put_group(make_group("g", image=image.reference()))
    orphan = make_group("g", image=image)
    with pytest.raises(ValueError, match="the group does not carry"):
        q.put_group(d.Group("g", "q", orphan.trajectories))
    assert q.backlog() == 0
    assert _image_keys(redis_client, q) == []


def test_touched_groups_are_not_reclaimed_and_touching_is_no_delivery(redis_client):
    q = _queue(redis_client)
    ids = [q.put_group(make_group(f"g{i}")) for i in range(3)]
    assert [x.entry_id for x in q.take_groups("holder", count=3)] == ids
    time.sleep(0.06)
    assert q.touch_groups("holder", ids[:2]) == 2
    reclaimed = q.reclaim("thief", min_idle_ms=50)
    assert [x.entry_id for x in reclaimed] == ids[2:]
    assert q._times_delivered(q.groups_key, q.settings.groups_consumer_group, ids[0]) == 1
    assert q.ack_groups(ids) == 3
    assert q.touch_groups("holder", ids) == 0  # no longer pending: ignored


def test_the_prompt_feeder_keeps_its_backlog_and_continues_after_a_restart(redis_client):
    from axpo.jobs.feeder import PromptFeeder
    from axpo.settings.job import JobSpec

    q = _queue(redis_client)
    spec = JobSpec.model_validate(
        {"name": "j", "model": "m", "questions_per_step": 2, "tasks": {"count": 3}}
    )
    feeder = PromptFeeder(q, spec)
    assert feeder.backlog == 4  # two steps' worth by default
    assert feeder.top_up() == 4
    assert feeder.top_up() == 0  # nothing done yet
    taken = q.take_prompts("w", count=3, block_ms=10)
    q.ack_prompts([t.entry_id for t in taken])
    # A new feeder (a restarted learner) continues the numbering from the queue's counter.
    assert PromptFeeder(q, spec).top_up() == 3
    ids = [t.task.task_id for t in q.take_prompts("w", count=10, block_ms=10)]
    assert ids == ["q3", "q4", "q5", "q6"]
    assert [t.task.question_id for t in taken] == ["q0", "q1", "q2"]
