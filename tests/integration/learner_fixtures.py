"""Tiny text-only groups for learner tests, and the tiny model they train (built once)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from axpo.domain import Group, Reward, Trajectory
from axpo.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-learner") / "model", seed=0)


def text_group(gid: str, *, size: int = 4, version: int = 0) -> Group:
    """A group of ``size`` short rollouts (6 prompt tokens, 4 to 11 generated), half correct,
    token ids inside the tiny model's vocabulary."""
    rng = random.Random(gid)
    prompt = [rng.randrange(10, 900) for _ in range(6)]
    trajs = []
    for i in range(size):
        gen = [rng.randrange(10, 900) for _ in range(rng.randrange(4, 12))]
        ids = tuple(prompt + gen)
        trajs.append(
            Trajectory(
                trajectory_id=f"{gid}/{i}",
                token_ids=ids,
                loss_mask=(False,) * len(prompt) + (True,) * len(gen),
                logprobs=tuple(-7.0 for _ in ids),
                entropies=(0.0,) * len(ids),
                segments=(),
                prompt_length=len(prompt),
                reward=Reward.zero("x") if i % 2 else Reward(1.0, True, 1, 0, 0, "a", "", ""),
            )
        )
    return Group(gid, f"q-{gid}", tuple(trajs), policy_version=version)
