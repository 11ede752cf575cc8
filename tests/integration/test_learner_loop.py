"""axpo_learner.loop in-process against a real private redis-server and the tiny model:
checkpoint-then-ack ordering, recovery from the newest checkpoint, partial steps, reclaim,
staleness, graceful stop. (Crashes of real processes: test_learner_crash.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import pytest

from axpo.contracts.domain import Group, Image
from axpo.queue import TrajectoryQueue
from axpo.settings.job import AlgorithmSpec, JobSpec
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo_learner import checkpoint
from axpo_learner.loop import LearnerLoop, describe
from axpo_learner.trainer import Trainer
from tests.integration import learner_fixtures, redis_fixtures
from tests.integration.learner_fixtures import text_group
from tests.integration.redis_fixtures import new_job_id

redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client
tiny_model = learner_fixtures.tiny_model

pytestmark = pytest.mark.integration


def _settings(model: Path, tmp_path: Path | None, **kw) -> LearnerSettings:
    return LearnerSettings(
        model=str(model),
        lr=1e-3,
        seed=1,
        checkpoint_dir=str(tmp_path / "ckpt") if tmp_path else "",
        keep_checkpoints=100,
        redis_retry_s=5,
        **kw,
    )


def _queue(client, job_id: str | None = None, **kw) -> TrajectoryQueue:
    settings = QueueSettings(block_ms=50, key_prefix=f"p{job_id or new_job_id()}", **kw)
    return TrajectoryQueue(client, job_id or new_job_id(), settings)


def _chain(root: Path) -> list[str]:
    """Entry ids recorded by every checkpoint under ``root``, oldest first."""
    out: list[str] = []
    for path in checkpoint.list_checkpoints(root):
        out += json.loads((path / "meta.json").read_text())["consumed_entry_ids"]
    return out


def test_steps_are_checkpointed_before_their_entries_are_acked(redis_client, tiny_model, tmp_path):
    s = _settings(tiny_model, tmp_path, questions_per_step=2, checkpoint_every=2, max_steps=3)
    q = _queue(redis_client)
    ids = [q.put_group(text_group(f"g{i}")) for i in range(7)]
    acks: list[tuple[list[str], list[str]]] = []
    real_ack = q.ack_groups

    def spying_ack(entry_ids):
        entry_ids = list(entry_ids)
        acks.append((entry_ids, _chain(tmp_path / "ckpt")))
        return real_ack(entry_ids)

    q.ack_groups = spying_ack  # type: ignore[method-assign]
    loop = LearnerLoop(s, AlgorithmSpec(), q, Trainer(s))
    assert loop.run() == 3

    assert [a for a, _ in acks] == [ids[:4], ids[4:6]]
    for acked, durable in acks:
        assert set(acked) <= set(durable)  # every ack is covered by a written checkpoint
    assert _chain(tmp_path / "ckpt") == ids[:6]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "ckpt")] == [
        "step-00000002",
        "step-00000003",  # max_steps reached: checkpointed although checkpoint_every is 2
    ]
    st = loop.status()
    assert (st.step, st.policy_version, st.groups_trained, st.partial_steps) == (3, 3, 6, 0)
    assert st.queue.consumed == 6
    assert st.queue_lag == 1
    assert not st.running
    assert "loss" in st.last_metrics
    assert json.dumps(describe(st))


def test_a_restart_resumes_from_the_checkpoint_and_retrains_only_what_it_lacks(
    redis_client, tiny_model, tmp_path
):
    s = _settings(tiny_model, tmp_path, questions_per_step=2, checkpoint_every=2)
    q = _queue(redis_client)
    ids = [q.put_group(text_group(f"g{i}")) for i in range(8)]
    first = LearnerLoop(s, AlgorithmSpec(), q, Trainer(s))
    first.recover()
    for _ in range(3):
        assert first.run_step()
    # "Crash": step 3 was trained but no checkpoint covers it, so its groups are pending.
    assert _chain(tmp_path / "ckpt") == ids[:4]
    assert q.pending() == 2

    q2 = TrajectoryQueue(redis_client, q.job_id, q.settings)
    job = JobSpec(name=q.job_id, model="m", steps=4, questions_per_step=2)
    second = LearnerLoop(s, job, q2, Trainer(s))
    assert second.run() == 2
    assert second.trainer.step == 4
    chain = _chain(tmp_path / "ckpt")
    assert sorted(chain) == sorted(ids)
    assert len(chain) == len(set(chain))
    assert q2.backlog() == 0
    assert q2.counters().consumed == 8


def test_a_partial_step_after_step_timeout(redis_client, tiny_model):
    s = _settings(tiny_model, None, questions_per_step=4, step_timeout_s=0.2, max_steps=1)
    q = _queue(redis_client)
    q.put_group(text_group("only"))
    loop = LearnerLoop(s, AlgorithmSpec(), q, Trainer(s))
    started = time.monotonic()
    assert loop.run() == 1
    assert time.monotonic() - started >= 0.2
    st = loop.status()
    assert (st.groups_trained, st.partial_steps, st.queue_lag) == (1, 1, 0)


def test_groups_of_a_dead_consumer_are_reclaimed_and_stale_ones_dropped(redis_client, tiny_model):
    s = _settings(tiny_model, None, questions_per_step=2, max_steps=11)
    q = _queue(redis_client, claim_idle_ms=50, max_policy_lag=2)
    q.put_group(text_group("old", version=1))  # 10 - 2 > 1: stale
    q.put_group(text_group("a", version=9))
    q.put_group(text_group("b", version=9))
    assert len(q.take_groups("dead-learner", count=3, current_version=0)) == 3
    trainer = Trainer(s)
    trainer.step = trainer.policy_version = 10
    loop = LearnerLoop(s, AlgorithmSpec(), q, trainer)
    assert loop.run() == 1
    st = loop.status()
    assert st.groups_trained == 2
    assert (st.queue.reclaimed, st.queue.dropped_stale, st.queue.consumed) == (3, 1, 2)
    assert st.queue_lag == 0


def test_stop_request_ends_the_loop_and_checkpoints_what_it_trained(
    redis_client, tiny_model, tmp_path
):
    s = _settings(tiny_model, tmp_path, questions_per_step=2, checkpoint_every=100)
    q = _queue(redis_client)
    ids = [q.put_group(text_group(f"g{i}")) for i in range(3)]
    loop = LearnerLoop(s, AlgorithmSpec(), q, Trainer(s))
    thread = threading.Thread(target=loop.run)
    thread.start()
    deadline = time.monotonic() + 30
    while loop.status().step < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    loop.request_stop()
    thread.join(30)
    assert not thread.is_alive()
    assert loop.trainer.step == 1
    assert _chain(tmp_path / "ckpt") == ids[:2]  # checkpointed on stop, then acked
    # The third group is neither trained nor acknowledged: still queued, or taken for the
    # interrupted step (whether the stop came before or after that take is a race).
    assert q.backlog() == 1
    assert q.pending() in (0, 1)


def _spoil(group: Group, **changes) -> Group:
    """``group`` with its first trajectory changed (still passing Trajectory.validate)."""
    first = dataclasses.replace(group.trajectories[0], **changes)
    return dataclasses.replace(group, trajectories=(first, *group.trajectories[1:]))


def test_groups_the_trainer_cannot_batch_are_dead_lettered_and_the_rest_trained(
    redis_client, tiny_model
):
    s = _settings(tiny_model, None, questions_per_step=3, max_steps=2)
    q = _queue(redis_client)
    trainer = Trainer(s)
    assert trainer.image_encoder is not None
    pad = trainer.image_encoder.image_token_id
    vocab = trainer.model.get_input_embeddings().num_embeddings

    def placeholder_without_image(gid: str) -> Group:
        g = text_group(gid)
        t = g.trajectories[0]
        return _spoil(g, token_ids=(pad, *t.token_ids[1:]))

    g = text_group("undecodable")
    junk = Image.from_bytes(os.urandom(256), "image/png")  # passes the queue's hash check
    undecodable = dataclasses.replace(
        _spoil(g, image_sha256=(junk.sha256,), token_ids=(pad, *g.trajectories[0].token_ids[1:])),
        images=(junk,),
    )
    g = text_group("out-of-vocab")
    out_of_vocab = _spoil(g, token_ids=(*g.trajectories[0].token_ids[:-1], vocab + 5))

    ids = [
        q.put_group(x)
        for x in (
            text_group("g0"),
            placeholder_without_image("bad-placeholder"),
            text_group("g1"),
            # A step with no trainable group: nothing trained, the loop goes on.
            undecodable,
            out_of_vocab,
            placeholder_without_image("bad-placeholder-2"),
            text_group("g2"),
            text_group("g3"),
            text_group("g4"),
        )
    ]
    loop = LearnerLoop(s, AlgorithmSpec(), q, trainer)
    assert loop.run() == 2

    st = loop.status()
    assert (st.step, st.groups_trained, st.groups_dead_lettered) == (2, 5, 4)
    assert (st.queue.dead_lettered, st.queue.consumed) == (4, 5)
    assert st.partial_steps == 1
    assert st.queue_lag == 0
    letters = {x["entry_id"].decode(): x["reason"].decode() for x in q.dead_letters()}
    assert set(letters) == {ids[1], ids[3], ids[4], ids[5]}
    assert "image placeholders in token_ids but no image_sha256" in letters[ids[1]]
    assert "bad-placeholder" in letters[ids[1]]
    assert "UnidentifiedImageError" in letters[ids[3]]
    assert f"outside the model's vocabulary of {vocab}" in letters[ids[4]]
    assert all(x["consumer"] == s.consumer.encode() for x in q.dead_letters())
