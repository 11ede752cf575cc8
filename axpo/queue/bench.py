"""``axpo bench queue``: groups per second through the trajectory queue on a real Redis.

Each group is GRPO-sized: ``rollouts`` trajectories of ``tokens`` tokens (ids, loss mask,
logprobs, entropies) and one ``image_kib`` KiB image of its own (random bytes, so nothing is
shared or compressed). Producing is ``put_group`` (protobuf encoding and the Lua script that
stores the image and adds the entry); consuming is ``take_groups`` + ``ack_groups`` (read,
image re-attached, protobuf decoded, every trajectory validated, acknowledged). Redis is a
private server with ``appendfsync always`` unless ``redis_url`` is given. Backpressure is off
so the two sides are timed separately.

``headroom`` = consume rate / the learner's consume rate. This core module cannot run the
learner (it lives in the learner service, which the core must not import), so the learner's
rate is passed in: either measured by the caller (``learner_groups_per_s`` with
``learner_rate_source`` saying what was measured: ``axpo_learner.bench`` trains the tiny model
and passes its figure here), or, without it, the assumption ``groups_per_step /
learner_step_s``, by default 16 groups per ~2 s step, i.e. 8 groups/s (a GRPO-sized step of
16 questions x 8 rollouts on a tiny model took 1.7-2.4 s on 2 cores: docs/platform.md,
"Cost of a GRPO-sized step").
"""

from __future__ import annotations

import os
import time
from typing import Any

from axpo.contracts import domain as d
from axpo.queue import TrajectoryQueue, connect
from axpo.settings.queue import QueueSettings

__all__ = ["print_table", "run"]


def _group(index: int, rollouts: int, tokens: int, image_bytes: int) -> d.Group:
    image = d.Image.from_bytes(os.urandom(image_bytes), "image/png")
    prompt = min(256, tokens // 4)
    trajs = tuple(
        d.Trajectory(
            trajectory_id=f"b{index}/{r}",
            token_ids=tuple((i * 7 + r) % 150_000 for i in range(tokens)),
            loss_mask=tuple(i >= prompt for i in range(tokens)),
            logprobs=tuple(-0.25 if i >= prompt else 0.0 for i in range(tokens)),
            entropies=tuple(0.5 if i >= prompt else 0.0 for i in range(tokens)),
            segments=(
                d.Segment(d.SegmentKind.PROMPT, 0, prompt),
                d.Segment(d.SegmentKind.ANSWER, prompt, tokens, policy_version=1),
            ),
            prompt_length=prompt,
            image_sha256=(image.sha256,),
            reward=d.Reward(1.0, True, 1.0, 0.0, 0.0, "A", "choice", "ok"),
        )
        for r in range(rollouts)
    )
    return d.Group(f"b{index}", f"q{index}", trajs, (image,), policy_version=1, job_id="bench")


def run(
    *,
    groups: int = 200,
    rollouts: int = 8,
    tokens: int = 1024,
    image_kib: int = 64,
    batch: int = 16,
    learner_step_s: float = 2.0,
    groups_per_step: int = 16,
    redis_url: str | None = None,
    learner_groups_per_s: float | None = None,
    learner_rate_source: str = "",
) -> dict[str, Any]:
    """Produce then consume ``groups`` groups; rates in groups per second. The headroom uses
    ``learner_groups_per_s`` when given (a measured rate; ``learner_rate_source`` describes
    it), else the assumed ``groups_per_step / learner_step_s``."""
    if learner_groups_per_s is not None and learner_groups_per_s <= 0:
        raise ValueError(f"learner_groups_per_s must be > 0, got {learner_groups_per_s}")
    settings = QueueSettings(redis_url=redis_url, max_backlog=0, block_ms=100)
    client, server = connect(settings)
    try:
        queue = TrajectoryQueue(client, f"bench-{os.getpid()}-{time.time_ns()}", settings)
        items = [_group(i, rollouts, tokens, image_kib * 1024) for i in range(groups)]

        start = time.perf_counter()
        for group in items:
            queue.put_group(group)
        produce_s = time.perf_counter() - start
        used_memory = int(client.info("memory")["used_memory"])

        start = time.perf_counter()
        consumed = 0
        while consumed < groups:
            deliveries = queue.take_groups("bench", count=batch)
            queue.ack_groups([x.entry_id for x in deliveries])
            consumed += len(deliveries)
        consume_s = time.perf_counter() - start
        counters = queue.counters()
        version = client.info("server")["redis_version"]
        client.delete(queue.groups_key, queue.prompts_key, queue.stats_key, queue.dead_key)
    finally:
        client.close()
        if server is not None:
            server.stop()

    produce_rate = groups / produce_s
    consume_rate = groups / consume_s
    if learner_groups_per_s is None:
        learner_rate = groups_per_step / learner_step_s
        source = (
            f"assumed: {groups_per_step} groups per {learner_step_s:g} s step "
            "(docs/platform.md GRPO-sized step on 2 cores); not measured"
        )
    else:
        learner_rate = learner_groups_per_s
        source = learner_rate_source or "measured"
    return {
        "groups": groups,
        "rollouts_per_group": rollouts,
        "tokens_per_rollout": tokens,
        "image_kib": image_kib,
        "produce_groups_per_s": round(produce_rate, 1),
        "consume_groups_per_s": round(consume_rate, 1),
        "groups_per_s": round(min(produce_rate, consume_rate), 1),
        "redis_used_memory_mib_at_full_backlog": round(used_memory / 2**20, 1),
        "learner_groups_per_s": round(learner_rate, 2),
        "learner_rate_source": source,
        "headroom": round(consume_rate / learner_rate, 1),
        "dead_lettered": counters.dead_lettered,
        "redis": f"{version} ({'external' if redis_url else 'private, appendfsync always'})",
    }


def print_table(result: dict[str, Any]) -> None:
    """People's view of :func:`run`'s result."""
    print(
        f"queue: {result['groups']} groups of {result['rollouts_per_group']} x "
        f"{result['tokens_per_rollout']} tokens + one {result['image_kib']} KiB image, "
        f"Redis {result['redis']}"
    )
    print(f"  produce   {result['produce_groups_per_s']:>9.1f} groups/s")
    print(f"  consume   {result['consume_groups_per_s']:>9.1f} groups/s")
    learner = result["learner_groups_per_s"]
    print(f"  learner   {learner:>9.2f} groups/s ({result['learner_rate_source']})")
    print(f"  headroom  {result['headroom']:>9.1f} x  (consume / learner)")
