"""One learner step under torchrun (run by test_learner_fsdp.py): ``MODEL OUT BUDGET``.
Rank 0 writes the step's metrics and a few full parameters to ``OUT`` (torch.save)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from learner_fixtures import text_group

from axpo.config import LearnerSettings
from axpo_learner.trainer import Trainer

PARAMS = (
    "embed_tokens.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.1.self_attn.q_proj.weight",
)


def main() -> None:
    model, out, budget = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    t = Trainer(LearnerSettings(model=model, lr=1e-3, seed=1, micro_batch_tokens=budget))
    assert t.world.size == 2, t.world
    metrics = t.train_step([text_group(f"g{i}") for i in range(3)])
    params = {}
    for name, p in t.model.state_dict().items():
        if name.endswith(PARAMS):
            full = getattr(p, "full_tensor", None)  # a collective: every rank calls it
            params[name] = (full() if full is not None else p).detach().clone()
    if t.world.rank == 0:
        torch.save({"metrics": metrics, "params": params}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
