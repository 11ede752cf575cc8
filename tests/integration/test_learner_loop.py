"""axpo_learner.loop in-process against a real private redis-server and the tiny model:
checkpoint-then-ack ordering, recovery from the newest checkpoint, partial steps, reclaim,
staleness, graceful stop. (Crashes of real processes: test_learner_crash.py.)"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from axpo.config import AlgorithmSpec, JobSpec, LearnerSettings, QueueSettings
from axpo.queue import TrajectoryQueue
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
    assert q.backlog() == 1
    assert q.pending() == 1
