"""Learner steps under torchrun (run by test_learner_fsdp.py): ``MODEL OUT BUDGET CKPT``.

Step 1 on three groups, then a sharded checkpoint in ``CKPT``, then step 2; then a second
trainer (fresh, as after a restart) loads that checkpoint and takes step 2 again. Rank 0 writes
to ``OUT`` (torch.save): step 1's metrics and a few full parameters, both step 2's metrics and
whether the two trainers' full weights after step 2 are bit-identical; then a trainer with a KL
term: whether its reference is sharded, and its step's metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from learner_fixtures import text_group

from axpo.settings.learner import LearnerSettings
from axpo_learner import checkpoint
from axpo_learner.trainer import Trainer

PARAMS = (
    "embed_tokens.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.1.self_attn.q_proj.weight",
)
STEP1 = [f"g{i}" for i in range(3)]
STEP2 = ["h0", "h1"]


def settings(model: str, budget: int) -> LearnerSettings:
    return LearnerSettings(
        model=model, lr=1e-3, seed=1, micro_batch_tokens=budget, warmup_steps=3, weight_decay=0.01
    )


def main() -> None:
    model, out, budget, ckpt = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    s = settings(model, budget)
    t = Trainer(s)
    assert t.world.size == 2, t.world
    metrics = t.train_step([text_group(g) for g in STEP1])
    params = {}
    for name, p in t.model.state_dict().items():
        if name.endswith(PARAMS):
            full = getattr(p, "full_tensor", None)  # a collective: every rank calls it
            params[name] = (full() if full is not None else p).detach().clone()
    t.policy_version = 1
    info = checkpoint.save(t, ckpt, consumed_entry_ids=["1-0"])
    step2 = t.train_step([text_group(g) for g in STEP2])
    weights = t.full_state_dict()  # rank 0 only

    resumed = Trainer(s)
    got = checkpoint.load_latest(resumed, ckpt)
    assert got is not None
    assert got.path == info.path, (got, info)
    assert (resumed.step, resumed.policy_version) == (1, 1)
    step2_resumed = resumed.train_step([text_group(g) for g in STEP2])
    weights_resumed = resumed.full_state_dict()

    # With a KL term the reference is sharded like the policy: a rank holds its shard only.
    # Measured after a step: FSDP2 would leave the root's parameters gathered after the
    # reference's forward (no backward reshards them) unless the trainer reshards it.
    kl = Trainer(s.model_copy(update={"kl_coef": 0.1}))
    assert kl.reference is not None
    kl_step = kl.train_step([text_group(g) for g in STEP1])
    ref_params = list(kl.reference.parameters())
    sharded = all(type(p).__name__ == "DTensor" for p in ref_params)
    local = sum(p.to_local().numel() for p in ref_params if hasattr(p, "to_local"))
    if t.world.rank == 0:
        assert weights is not None
        assert weights_resumed is not None
        assert set(weights) == set(t.model.state_dict())
        identical = all(torch.equal(weights[k], weights_resumed[k]) for k in weights)
        torch.save(
            {
                "metrics": metrics,
                "params": params,
                "step2": step2,
                "step2_resumed": step2_resumed,
                "identical": identical,
                "full_names": sorted(weights),
                "reference_sharded": sharded,
                "reference_local_fraction": local / sum(p.numel() for p in ref_params),
                "kl_step": kl_step,
            },
            out,
        )
    else:
        assert weights is None
        assert weights_resumed is None
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
