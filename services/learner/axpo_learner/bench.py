"""The learner's measured consumption rate, and the queue's headroom over it.

:func:`measure_learner` builds the tiny model in a temporary directory and times
``Trainer.train_step`` (after one warm-up step) on synthetic text-only groups, reporting
groups/s and tokens/s. The representative step is GRPO-shaped but shorter than the queue
bench's groups: 16 groups x 8 rollouts x 256 tokens (64 prompt + 192 generated), text only.
A full-size step (8 rollouts x 1k tokens with a 64 KiB image per group) takes tens of seconds
on 2 CPU cores, too long to repeat here; the per-group rate at 256 tokens is therefore an
upper bound on the learner's rate at 1k tokens, which makes the headroom figure conservative.

:func:`run` runs the queue bench (:func:`axpo.queue_bench.run`, real Redis) and reports its
``headroom`` over the measured rate instead of an assumed one. The core package cannot do this
itself: it must not import the learner service.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from axpo import queue_bench
from axpo.config import LearnerSettings
from axpo.domain import Group, Reward, Trajectory
from axpo.tiny_model import build_tiny_model

__all__ = ["measure_learner", "print_table", "run"]


def _group(index: int, rollouts: int, tokens: int, rng: random.Random) -> Group:
    prompt_len = min(64, tokens // 4)
    prompt = [rng.randrange(10, 900) for _ in range(prompt_len)]  # inside the tiny vocabulary
    trajs = []
    for r in range(rollouts):
        ids = tuple(prompt + [rng.randrange(10, 900) for _ in range(tokens - prompt_len)])
        correct = r % 2 == 0  # half right: non-zero advantages, a real gradient
        trajs.append(
            Trajectory(
                trajectory_id=f"l{index}/{r}",
                token_ids=ids,
                loss_mask=tuple(i >= prompt_len for i in range(tokens)),
                logprobs=tuple(-6.9 if i >= prompt_len else 0.0 for i in range(tokens)),
                entropies=(0.0,) * tokens,
                segments=(),
                prompt_length=prompt_len,
                reward=Reward(1.0, True, 1, 0, 0, "a", "", "") if correct else Reward.zero("x"),
            )
        )
    return Group(f"l{index}", f"q{index}", tuple(trajs), policy_version=0)


def measure_learner(
    *,
    groups_per_step: int = 16,
    rollouts: int = 8,
    tokens: int = 256,
    steps: int = 3,
    micro_batch_tokens: int = 8192,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``steps`` training steps of ``groups_per_step`` groups (after one warm-up step)
    on the tiny model, fp32; rates over the timed steps."""
    from axpo_learner.trainer import Trainer  # torch + transformers: import when measuring

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = random.Random(seed)
    batches = [
        [_group(s * groups_per_step + i, rollouts, tokens, rng) for i in range(groups_per_step)]
        for s in range(steps + 1)
    ]
    with tempfile.TemporaryDirectory(prefix="axpo-learner-bench-") as tmp:
        model = build_tiny_model(Path(tmp) / "model", seed=seed)
        settings = LearnerSettings(
            model=str(model), lr=1e-5, seed=seed, micro_batch_tokens=micro_batch_tokens
        )
        trainer = Trainer(settings)
        trainer.train_step(batches[0])  # warm-up: allocator, kernels, optimizer state
        times = []
        for groups in batches[1:]:
            start = time.perf_counter()
            trainer.train_step(groups)
            times.append(time.perf_counter() - start)
    total_s = sum(times)
    step_tokens = groups_per_step * rollouts * tokens
    return {
        "learner_step_shape": (
            f"{groups_per_step} groups x {rollouts} rollouts x {tokens} tokens, text only, "
            f"tiny model fp32, micro_batch_tokens {micro_batch_tokens}"
        ),
        "learner_steps_timed": steps,
        "learner_step_s": round(total_s / steps, 3),
        "learner_step_s_min": round(min(times), 3),
        "learner_groups_per_s": round(groups_per_step * steps / total_s, 2),
        "learner_tokens_per_s": round(step_tokens * steps / total_s, 1),
    }


def run(
    *,
    groups: int = 200,
    learner_groups_per_step: int = 16,
    learner_rollouts: int = 8,
    learner_tokens: int = 256,
    learner_steps: int = 3,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """The queue bench with its headroom over the learner's measured rate."""
    learner = measure_learner(
        groups_per_step=learner_groups_per_step,
        rollouts=learner_rollouts,
        tokens=learner_tokens,
        steps=learner_steps,
    )
    rate = float(learner["learner_groups_per_s"])
    source = (
        f"measured: {learner['learner_steps_timed']} train_steps of "
        f"{learner['learner_step_shape']}, {learner['learner_step_s']:g} s per step"
    )
    result = queue_bench.run(
        groups=groups,
        redis_url=redis_url,
        learner_groups_per_s=rate,
        learner_rate_source=source,
    )
    result.update(learner)
    return result


def print_table(result: dict[str, Any]) -> None:
    """People's view of :func:`run`'s result."""
    queue_bench.print_table(result)
    print(f"  learner   {result['learner_tokens_per_s']:>9.1f} tokens/s")
