"""LearnerService.Status through the generated stub (port 0), and ``serve`` wired end to end:
queue from settings, trainer, loop in a background thread, exit when max_steps is reached."""

from __future__ import annotations

import threading

import grpc
import pytest

from axpo.queue import TrajectoryQueue
from axpo.settings.base import RpcServerSettings
from axpo.settings.job import AlgorithmSpec
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo.v1 import learner_pb2, learner_pb2_grpc
from axpo_learner import server
from axpo_learner.loop import LearnerLoop
from axpo_learner.trainer import Trainer
from tests.integration import learner_fixtures, redis_fixtures
from tests.integration.learner_fixtures import text_group
from tests.integration.redis_fixtures import new_job_id

redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client
tiny_model = learner_fixtures.tiny_model

pytestmark = pytest.mark.integration


def _status(port: int) -> learner_pb2.LearnerServiceStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        return stub.Status(learner_pb2.LearnerServiceStatusRequest(), timeout=10)


def test_status_reports_the_loop_and_the_queue(redis_client, tiny_model):
    job = new_job_id()
    qs = QueueSettings(block_ms=50, key_prefix=f"p{job}", max_policy_lag=0)
    settings = LearnerSettings(
        model=str(tiny_model), questions_per_step=2, max_steps=1, rpc=RpcServerSettings(port=0)
    )
    q = TrajectoryQueue(redis_client, job, qs)
    for i in range(5):
        q.put_group(text_group(f"g{i}"))
    loop = LearnerLoop(settings, AlgorithmSpec(), q, Trainer(settings))
    running = server.start(settings, loop)
    try:
        before = _status(running.port)
        assert (before.step, before.queue_lag, before.groups_consumed) == (0, 5, 0)
        assert before.job_id == job
        assert loop.run() == 1
        # The 3 groups left and one more, all of version 0, taken at version 1 with lag 0.
        q.put_group(text_group("old", version=0))
        assert q.take_groups("other", count=10, current_version=1) == []
        after = _status(running.port)
    finally:
        running.stop(None)
    assert (after.step, after.policy_version, after.groups_consumed) == (1, 1, 2)
    assert after.groups_dropped_stale == 4
    assert after.queue_lag == 0
    assert {"loss", "clip_fraction", "grad_norm"} <= set(after.last_metrics)


def test_serve_trains_until_max_steps_then_exits(redis_server, redis_client, tiny_model, tmp_path):
    job = new_job_id()
    qs = QueueSettings(redis_url=redis_server.url, block_ms=50, key_prefix=f"p{job}")
    q = TrajectoryQueue(redis_client, job, qs)
    ids = [q.put_group(text_group(f"g{i}")) for i in range(4)]
    settings = LearnerSettings(
        model=str(tiny_model),
        job_id=job,
        queue=qs,
        questions_per_step=2,
        max_steps=2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=1,
        rpc=RpcServerSettings(port=0),
    )
    port_file = tmp_path / "port"
    thread = threading.Thread(target=server.serve, args=(settings, port_file))
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert port_file.read_text().strip().isdigit()
    assert q.backlog() == 0
    assert q.counters().consumed == len(ids)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step-00000001",
        "step-00000002",
    ]
