"""Where the learner trains: device resolution (a pure function), batches moved with the model,
bfloat16 on CPU against float32, and (marked ``gpu``) a real step on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from axpo.settings.learner import LearnerSettings
from axpo.study.tiny_model import build_tiny_model
from axpo_learner import trainer as trainer_mod
from axpo_learner.batch import micro_batches, rows_from_groups
from axpo_learner.distributed import init_from_env, resolve_device
from axpo_learner.trainer import Trainer
from tests.unit.learner.test_trainer import make_groups


@pytest.mark.parametrize(
    ("setting", "cuda", "local_rank", "expected"),
    [
        ("auto", False, 0, "cpu"),
        ("auto", False, 3, "cpu"),
        ("auto", True, 0, "cuda:0"),
        ("auto", True, 3, "cuda:3"),  # torchrun's LOCAL_RANK picks the GPU
        ("cpu", True, 1, "cpu"),  # CPU on a GPU host when asked
        ("cuda", True, 2, "cuda:2"),
        ("cuda:5", True, 2, "cuda:5"),  # an explicit index wins over the local rank
    ],
)
def test_resolve_device(setting, cuda, local_rank, expected):
    assert resolve_device(setting, cuda_available=cuda, local_rank=local_rank) == torch.device(
        expected
    )


@pytest.mark.parametrize("setting", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_an_error_naming_the_setting(setting):
    with pytest.raises(ValueError, match=f"device: '{setting}'.*CUDA is not available"):
        resolve_device(setting, cuda_available=False)


def test_device_setting_is_validated():
    with pytest.raises(ValidationError, match="device"):
        LearnerSettings(device="gpu")
    assert LearnerSettings().device == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only host")
def test_one_process_world_on_a_cpu_host(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("auto").device == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        init_from_env("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_a_micro_batch_moves_every_tensor(tiny):
    t = Trainer(LearnerSettings(model=str(tiny), device="cpu"))
    rows = rows_from_groups(make_groups(0), t.spec)
    [mb] = micro_batches(rows, 10_000, t.pad_id)
    assert mb.to(torch.device("cpu")) is mb
    moved = mb.to(torch.device("meta"))  # a device every host has: no copy of the data
    tensors = {k: v for k, v in vars(moved).items() if isinstance(v, torch.Tensor)}
    assert set(tensors) >= {"input_ids", "attention_mask", "loss_mask", "rollout_logprobs"}
    assert all(v.device.type == "meta" for v in tensors.values()), tensors
    assert moved.rows is mb.rows


def test_bfloat16_step_matches_float32_on_cpu(tiny):
    base = {"model": str(tiny), "lr": 1e-3, "seed": 1, "device": "cpu"}
    fp32 = Trainer(LearnerSettings(**base))
    bf16 = Trainer(LearnerSettings(**base, dtype="bfloat16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a, b = fp32.train_step(make_groups(0)), bf16.train_step(make_groups(0))
    assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-2)
    assert b["logprob_mismatch_mean"] == pytest.approx(a["logprob_mismatch_mean"], rel=1e-2)


def test_bf16_mixed_keeps_float32_master_weights_and_computes_in_bfloat16(tiny, monkeypatch):
    base = {"model": str(tiny), "lr": 1e-3, "seed": 1, "device": "cpu"}
    fp32 = Trainer(LearnerSettings(**base))
    mixed = Trainer(LearnerSettings(**base, dtype="bf16-mixed"))
    seen: list[torch.dtype] = []
    linear = next(m for n, m in mixed.model.named_modules() if n.endswith("mlp.down_proj"))
    linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    a, b = fp32.train_step(make_groups(0)), mixed.train_step(make_groups(0))
    assert seen  # the layers ran in bfloat16 ...
    assert set(seen) == {torch.bfloat16}
    # ... on float32 parameters and AdamW states (the master weights).
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}
    states = [v for st in mixed.optimizer.state.values() for v in st.values() if v.dim() > 0]
    assert states
    assert {v.dtype for v in states} == {torch.float32}
    assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-2)
    # Published in bfloat16 (what a replica serving the checkpoint in bf16 accepts), on the host.
    published = mixed.full_state_dict()
    assert published is not None
    assert {v.dtype for v in published.values()} == {torch.bfloat16}
    assert {v.device.type for v in published.values()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_on_cuda_keeps_model_and_batches_on_the_gpu(tiny, monkeypatch):
    seen: list[torch.device] = []
    real = trainer_mod.token_logprobs

    def spy(model, batch, processing, **kw):
        seen.extend(v.device for v in batch.model_inputs().values())
        seen.extend(t.device for t in (batch.loss_mask, batch.advantages, batch.rollout_logprobs))
        seen.extend(t.device for t in kw.values() if isinstance(t, torch.Tensor))
        return real(model, batch, processing, **kw)

    monkeypatch.setattr(trainer_mod, "token_logprobs", spy)
    t = Trainer(LearnerSettings(model=str(tiny), device="cuda", micro_batch_tokens=40))
    metrics = t.train_step(make_groups(0))
    assert metrics["micro_batches"] > 1
    assert seen
    assert all(d.type == "cuda" for d in seen), seen
    assert all(p.device.type == "cuda" for p in t.model.parameters())
    state = t.full_state_dict()
    assert state is not None
