"""axpo_learner.publish against a recording InferenceService on a real gRPC server (port 0).

The fake servicer (``learner_fixtures.RecordingInference``) applies the inference engine's own
weight checks (axpo_inference.checkpoint: ``check_weights`` on the file's headers for LoadWeights,
``WeightStreamAssembler`` for the stream) against the tiny checkpoint the model was built from,
then records what it got. The real vLLM engine's load path is tested with the inference
service. The loop re-publishes restored weights after a restart at a version the replicas
accept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from axpo.queue import TrajectoryQueue
from axpo.settings.job import AlgorithmSpec, JobSpec
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo.study.tiny_model import build_tiny_model
from axpo_learner import checkpoint
from axpo_learner.loop import LearnerLoop
from axpo_learner.publish import PathPublisher, PublishError, StreamPublisher
from axpo_learner.trainer import Trainer
from tests.integration import learner_fixtures, redis_fixtures
from tests.integration.learner_fixtures import RecordingInference, fake_replicas, text_group
from tests.integration.redis_fixtures import new_job_id

redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client
tiny_model = learner_fixtures.tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path):
    from transformers import AutoModelForImageTextToText

    ckpt = build_tiny_model(tmp_path / "model", tie_word_embeddings=request.param)
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "trained" weights differ from the checkpoint
    fakes = [RecordingInference(ckpt), RecordingInference(ckpt)]
    with fake_replicas(fakes) as targets:
        yield model, fakes, targets, tmp_path


def _check_received(model, fakes, version):
    want = model.state_dict()
    for fake in fakes:
        got_version, tensors = fake.loaded[-1]
        assert got_version == version
        for name, t in tensors.items():
            assert torch.equal(t, want[name]), name


@pytest.mark.parametrize("transport", ["path", "stream"])
def test_publish_reaches_every_replica_with_serving_names(setup, transport):
    model, fakes, targets, tmp = setup
    if transport == "path":
        pub = PathPublisher(targets, tmp / "shared", keep=1)
    else:
        pub = StreamPublisher(targets, chunk_bytes=4096)  # many chunks per tensor
    try:
        for version in (1, 2):
            res = pub.publish(model, version)
            assert res.replicas == 2
            _check_received(model, fakes, version)
        # A replica that refuses (version not newer) fails the publish loudly.
        with pytest.raises(PublishError, match="stale version"):
            pub.publish(model, 2)
    finally:
        pub.close()
    if transport == "path":
        assert [p.name for p in (tmp / "shared").glob("v*")] == ["v00000002"]


@pytest.mark.parametrize("known_by", ["record", "status"])
def test_a_restart_publishes_the_restored_weights_above_the_served_version(
    redis_client, tiny_model: Path, tmp_path: Path, known_by: str
):
    """Version 3 was published, then the learner crashed before checkpointing step 3 (the
    newest checkpoint is step 2). The restarted learner publishes its restored weights (step
    2's) as version 4, above what the replica serves, and goes on from there. It knows 3 was
    published from its record (``published.json``) or, without one, from the replica's
    Status."""
    fake = RecordingInference(tiny_model)
    job = new_job_id()
    # All groups are of version 0: a lag bound above the versions reached keeps them fresh.
    qs = QueueSettings(block_ms=50, key_prefix=f"p{job}", max_policy_lag=100)
    with fake_replicas([fake]) as targets:
        s = LearnerSettings(
            model=str(tiny_model),
            lr=1e-3,
            seed=1,
            questions_per_step=2,
            checkpoint_dir=str(tmp_path / "ckpt"),
            checkpoint_every=2,
            keep_checkpoints=100,
            redis_retry_s=5,
        )
        q = TrajectoryQueue(redis_client, job, qs)
        ids = [q.put_group(text_group(f"g{i}")) for i in range(8)]
        first_pub = PathPublisher(targets, tmp_path / "shared")
        first = LearnerLoop(s, AlgorithmSpec(), q, Trainer(s), first_pub)
        first.recover()  # a fresh start: the replica serves the initial weights already
        assert fake.loaded == []
        for _ in range(3):
            assert first.run_step()
        first_pub.close()
        # "Crash": step 3 is published but in no checkpoint.
        assert [v for v, _ in fake.loaded] == [1, 2, 3]
        assert checkpoint.last_published(tmp_path / "ckpt") == 3
        if known_by == "status":
            (tmp_path / "ckpt" / "published.json").unlink()

        job_spec = JobSpec(name=job, model="m", steps=4, questions_per_step=2)
        pub = PathPublisher(targets, tmp_path / "shared")
        second = LearnerLoop(s, job_spec, TrajectoryQueue(redis_client, job, qs), Trainer(s), pub)
        try:
            assert second.run() == 2
        finally:
            pub.close()
    assert [v for v, _ in fake.loaded] == [1, 2, 3, 4, 5, 6]
    published = dict(fake.loaded)
    for name, tensor in published[2].items():
        assert torch.equal(published[4][name], tensor), name  # the restored weights, exactly
    assert any(not torch.equal(published[4][k], published[3][k]) for k in published[3])
    st = second.status()
    assert (st.step, st.policy_version, st.published_version, st.publish_failures) == (4, 6, 6, 0)
    meta = json.loads((tmp_path / "ckpt" / "step-00000004" / "meta.json").read_text())
    assert meta["policy_version"] == 6
    chain = []
    for path in checkpoint.list_checkpoints(tmp_path / "ckpt"):
        chain += json.loads((path / "meta.json").read_text())["consumed_entry_ids"]
    assert chain == ids  # step 3's groups were trained again, once in the checkpoints
