"""The learner under torchrun with FSDP2 (2 processes, gloo on CPU) takes the same step as
one process: same loss, grad norm and updated parameters within float tolerance. Its sharded
checkpoint resumes bit-exactly under 2 processes and loads in 1 process (resharded).

(The whole loop and ``axpo serve learner`` under torchrun: test_learner_torchrun.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axpo.settings.learner import LearnerSettings
from axpo_learner import checkpoint
from axpo_learner.trainer import Trainer
from tests.integration import learner_fixtures
from tests.integration.learner_fixtures import text_group

pytestmark = pytest.mark.integration

tiny_model = learner_fixtures.tiny_model
WORKER = Path(__file__).with_name("fsdp_worker.py")
BUDGET = 48  # several micro-batches, an odd count: one rank runs a padding pass


def _settings(model: Path) -> LearnerSettings:
    """fsdp_worker.py's settings."""
    return LearnerSettings(
        model=str(model),
        lr=1e-3,
        seed=1,
        micro_batch_tokens=BUDGET,
        warmup_steps=3,
        weight_decay=0.01,
    )


def test_two_process_fsdp_step_matches_one_process(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tiny_model),
        str(out),
        str(BUDGET),
        str(ckpt),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = torch.load(out, weights_only=False)

    one = Trainer(_settings(tiny_model))
    ref = one.train_step([text_group(f"g{i}") for i in range(3)])
    assert one.world.size == 1
    m = got["metrics"]
    assert ref["micro_batches"] >= 3
    assert ref["micro_batches"] % 2 == 1
    assert m["micro_batches"] == ref["micro_batches"]
    assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert m["tokens"] == ref["tokens"]
    state = one.model.state_dict()
    assert len(got["params"]) >= 3
    for name, value in got["params"].items():
        # Adam's first step is ~lr * sign(grad): tolerance is a small fraction of lr = 1e-3.
        torch.testing.assert_close(value, state[name], rtol=0, atol=5e-5)

    # A restart from the sharded checkpoint (a fresh trainer on 2 processes) takes step 2
    # bit-exactly as the trainer that saved it.
    assert got["identical"]
    assert got["step2_resumed"]["loss"] == got["step2"]["loss"]
    assert got["step2_resumed"]["grad_norm"] == got["step2"]["grad_norm"]
    assert got["full_names"] == sorted(state)  # rank 0 gathered every tensor to publish

    # The KL reference is sharded like the policy (not a full copy per rank), and equals the
    # policy at the first step: KL 0, the same loss as without it.
    assert got["reference_sharded"]
    assert got["reference_local_fraction"] <= 0.55
    assert got["kl_step"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert got["kl_step"]["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)

    # The same checkpoint in 1 process: DCP reshards the parameters and Adam's states.
    resumed = Trainer(_settings(tiny_model))
    info = checkpoint.load_latest(resumed, ckpt)
    assert info is not None
    assert (info.step, info.policy_version, info.consumed_entry_ids) == (1, 1, ("1-0",))
    mine = resumed.model.state_dict()
    for name, value in state.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=5e-5)
    sa, sb = one.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sorted(sa["state"]) == sorted(sb["state"])  # no state for the untouched vision tower
    for i, st in sa["state"].items():
        assert torch.equal(st["step"], sb["state"][i]["step"])
        torch.testing.assert_close(st["exp_avg"], sb["state"][i]["exp_avg"], rtol=1e-3, atol=1e-6)
    assert resumed.scheduler.get_last_lr() == one.scheduler.get_last_lr()
    step2 = resumed.train_step([text_group(g) for g in ("h0", "h1")])
    assert step2["loss"] == pytest.approx(got["step2"]["loss"], rel=1e-5, abs=1e-7)
