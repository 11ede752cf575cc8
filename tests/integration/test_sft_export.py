"""The RL learner's final export (``LearnerSettings.export_dir``), in-process against a real
private redis-server and the tiny model: after the last step the trained policy is a complete
HF checkpoint that transformers loads with exactly the trainer's weights, in the input's dtype,
with every non-weight file of the input; no export before the last step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from axpo.queue import TrajectoryQueue
from axpo.settings.job import AlgorithmSpec
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo.study.tiny_model import build_tiny_model
from axpo_learner.loop import LearnerLoop
from axpo_learner.trainer import Trainer
from tests.integration import learner_fixtures, redis_fixtures
from tests.integration.learner_fixtures import text_group
from tests.integration.redis_fixtures import new_job_id

redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client
tiny_model = learner_fixtures.tiny_model

pytestmark = pytest.mark.integration


def _queue(client) -> TrajectoryQueue:
    job = new_job_id()
    return TrajectoryQueue(client, job, QueueSettings(block_ms=50, key_prefix=f"p{job}"))


def test_the_last_step_exports_a_checkpoint_with_the_trainers_weights(
    redis_client, tiny_model: Path, tmp_path: Path
) -> None:
    export = tmp_path / "final-model"
    s = LearnerSettings(
        model=str(tiny_model),
        lr=1e-3,
        questions_per_step=2,
        max_steps=2,
        export_dir=str(export),
        redis_retry_s=5,
    )
    q = _queue(redis_client)
    for i in range(4):
        q.put_group(text_group(f"g{i}"))
    trainer = Trainer(s)
    loop = LearnerLoop(s, AlgorithmSpec(), q, trainer)
    loop.recover()
    assert loop.run_step()
    assert not export.exists()  # not before the last step
    assert loop.run() == 1
    assert trainer.step == 2

    for path in tiny_model.iterdir():
        if not path.name.endswith(".safetensors"):
            assert (export / path.name).read_bytes() == path.read_bytes()
    model = AutoModelForImageTextToText.from_pretrained(export)
    AutoProcessor.from_pretrained(export)
    exported, trained = model.state_dict(), trainer.model.state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    initial = AutoModelForImageTextToText.from_pretrained(tiny_model).state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)  # it did train


def test_export_keeps_a_bfloat16_inputs_dtype(redis_client, tmp_path: Path) -> None:
    base = build_tiny_model(tmp_path / "bf16", seed=1)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16)
    model.save_pretrained(base)  # the same checkpoint, stored in bfloat16
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    export = tmp_path / "out"
    s = LearnerSettings(model=str(base), questions_per_step=1, max_steps=1, export_dir=str(export))
    q = _queue(redis_client)
    q.put_group(text_group("only"))
    trainer = Trainer(s)  # trains in float32
    assert LearnerLoop(s, AlgorithmSpec(), q, trainer).run() == 1
    stored: dict[str, torch.Tensor] = {}
    for path in export.glob("*.safetensors"):
        stored.update(load_file(str(path)))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # as stored, not cast on load
    trained = trainer.model.state_dict()
    assert stored.keys() <= trained.keys()
    for k, v in stored.items():
        assert torch.equal(v, trained[k].to(torch.bfloat16))
    AutoModelForImageTextToText.from_pretrained(export, dtype="auto")


def test_export_needs_a_local_checkpoint_directory(redis_client, tiny_model: Path) -> None:
    s = LearnerSettings(model=str(tiny_model), export_dir="/tmp/x")
    trainer = Trainer(s)
    bad = s.model_copy(update={"model": "Qwen/Qwen3-VL-2B-Thinking"})
    with pytest.raises(ValueError, match="export_dir needs model to be a local checkpoint"):
        LearnerLoop(bad, AlgorithmSpec(), _queue(redis_client), trainer)
