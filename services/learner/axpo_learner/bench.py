"""The learner's measured consumption rate, and the queue's headroom over it.

:func:`measure_learner` builds the tiny model in a temporary directory and times
``Trainer.train_step`` (after one warm-up step) on synthetic text-only groups, reporting
groups/s and tokens/s. The representative step is GRPO-shaped but shorter than the queue
bench's groups: 16 groups x 8 rollouts x 256 tokens (64 prompt + 192 generated), text only.
A full-size step (8 rollouts x 1k tokens with a 64 KiB image per group) takes tens of seconds
on 2 CPU cores, too long to repeat here; the per-group rate at 256 tokens is therefore an
upper bound on the learner's rate at 1k tokens, which makes the headroom figure conservative.

:func:`run` runs the queue bench (:func:`axpo.queue.bench.run`, real Redis) and reports its
``headroom`` over the measured rate instead of an assumed one. The core package cannot do this
itself: it must not import the learner service.

:func:`measure_publish` times weight publication to one REAL inference replica (``axpo serve
inference`` as a subprocess through :class:`axpo.local.processes.Processes`, on the tiny model) with
both transports, against a raw copy of the same bytes; see :data:`PUBLISH_DEFINITIONS`.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from axpo.contracts.domain import Group, Reward, Trajectory
from axpo.local.processes import Processes, settings_env
from axpo.queue import bench as queue_bench
from axpo.settings.base import RpcClientSettings
from axpo.settings.job import load_job_spec
from axpo.settings.learner import LearnerSettings
from axpo.study.tiny_model import DEFAULT_VOCAB_SIZE, build_tiny_model

__all__ = ["PUBLISH_DEFINITIONS", "measure_learner", "measure_publish", "print_table", "run"]

CONFIG = "configs/tiny-cpu-axpo.yaml"

PUBLISH_DEFINITIONS = {
    "publish_s": "median over `publish_versions` versions (after one warm-up version) of "
    "PathPublisher.publish(model, v).seconds to ONE real inference replica (axpo serve "
    "inference, vLLM, max_model_len 1024): serving_state_dict + safetensors write to "
    "publish_dir + LoadWeights until the replica confirms version v",
    "publish_stream_s": "the same with StreamPublisher (LoadWeightsStream, 4 MiB chunks)",
    "copy_s": "median over the same number of copies of shutil.copyfile of the published "
    "model.safetensors to a sibling file in the same directory (publish_dir), the raw copy "
    "of exactly the bytes the path transport writes",
    "publish_vs_copy_ratio": "publish_s / copy_s (floor: <= 1.5)",
    "stream_vs_copy_ratio": "publish_stream_s / copy_s",
    "publish_bytes": "tensor bytes per publication (PublishResult.bytes)",
    "publish_file_bytes": "size of the published model.safetensors (tensors + header)",
    "publish_weight_loader": "the replica's AXPO_WEIGHT_LOADER: 'direct' (default) or 'vllm' "
    "(vLLM's generic pause + disk reload + separate cache resets, the path before 2026-12-01)",
}


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


def _config_path() -> Path:
    import axpo

    for root in (Path(axpo.__file__).resolve().parent.parent, Path.cwd()):
        if (root / CONFIG).is_file():
            return root / CONFIG
    raise FileNotFoundError(f"{CONFIG} not found (run from the repository root)")


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def measure_publish(
    *,
    versions: int = 5,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    startup_timeout_s: float = 600.0,
    weight_loader: str = "direct",
) -> dict[str, Any]:
    """Publish versions ``1..versions`` (after one warm-up version) of the tiny model to one
    real inference replica with each transport, and copy the published file as many times;
    medians (see :data:`PUBLISH_DEFINITIONS`). ``weight_loader``: the replica's
    ``AXPO_WEIGHT_LOADER`` ("direct", its default, or "vllm", the generic path it replaced)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from axpo_learner.publish import PathPublisher, StreamPublisher

    if versions < 1:
        raise ValueError(f"versions must be >= 1, got {versions}")
    config = _config_path()
    spec = load_job_spec(config)
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="axpo-learner-publish-bench-") as tmp:
        run_dir = Path(tmp)
        publish_root = Path(
            tempfile.mkdtemp(prefix="axpo-learner-publish-", dir=shm if shm.is_dir() else tmp)
        )
        model_dir = build_tiny_model(run_dir / "model", seed=seed, vocab_size=vocab_size)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        procs = Processes(run_dir, out=sys.stderr)
        publishers: list[Any] = []
        try:
            inference = procs.start(
                "inference",
                "inference",
                {
                    **settings_env("AXPO_INFERENCE_", spec.run.inference),
                    "AXPO_INFERENCE_MODEL": str(model_dir.resolve()),
                    "AXPO_INFERENCE_MAX_MODEL_LEN": "1024",
                    "AXPO_INFERENCE_SEED": str(seed),
                    "AXPO_WEIGHT_LOADER": weight_loader,
                },
            )
            procs.wait_ready([inference], startup_timeout_s)
            target = [RpcClientSettings(target=f"127.0.0.1:{inference.port}", deadline_s=600.0)]
            path_pub = PathPublisher(target, publish_root)
            stream_pub = StreamPublisher(target)
            publishers = [path_pub, stream_pub]
            version = 0
            timed: dict[str, list[float]] = {"path": [], "stream": []}
            sizes: set[int] = set()
            for name, pub in (("path", path_pub), ("stream", stream_pub)):
                version += 1
                pub.publish(model, version)  # warm-up
                for _ in range(versions):
                    version += 1
                    result = pub.publish(model, version)
                    timed[name].append(result.seconds)
                    sizes.add(result.bytes)
            src = sorted(publish_root.glob("v*"))[-1] / "model.safetensors"
            file_bytes = src.stat().st_size
            copies = []
            for i in range(versions + 1):
                dst = src.with_name(f"copy-{i}.safetensors")
                start = time.perf_counter()
                shutil.copyfile(src, dst)
                elapsed = time.perf_counter() - start
                dst.unlink()
                if i:  # the first copy is the warm-up
                    copies.append(elapsed)
        finally:
            for pub in publishers:
                pub.close()
            procs.stop_all()
            shutil.rmtree(publish_root, ignore_errors=True)
    publish_s = _median(timed["path"])
    stream_s = _median(timed["stream"])
    copy_s = _median(copies)
    return {
        "publish_model": f"tiny Qwen3-VL, random init (seed {seed}, vocab {vocab_size}), fp32",
        "publish_replicas": 1,
        "publish_versions": versions,
        "publish_dir_kind": "/dev/shm" if shm.is_dir() else "temporary directory",
        "publish_weight_loader": weight_loader,
        "publish_bytes": max(sizes),
        "publish_file_bytes": file_bytes,
        "publish_s": round(publish_s, 4),
        "publish_s_all": [round(t, 4) for t in timed["path"]],
        "publish_stream_s": round(stream_s, 4),
        "publish_stream_s_all": [round(t, 4) for t in timed["stream"]],
        "copy_s": round(copy_s, 5),
        "copy_s_all": [round(t, 5) for t in copies],
        "publish_vs_copy_ratio": round(publish_s / copy_s, 1),
        "stream_vs_copy_ratio": round(stream_s / copy_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.platform()})",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "definitions": dict(PUBLISH_DEFINITIONS),
    }


def run(
    *,
    groups: int = 200,
    learner_groups_per_step: int = 16,
    learner_rollouts: int = 8,
    learner_tokens: int = 256,
    learner_steps: int = 3,
    redis_url: str | None = None,
    publish_versions: int = 5,
    publish_only: bool = False,
) -> dict[str, Any]:
    """The queue bench with its headroom over the learner's measured rate, and the
    publication figures (:func:`measure_publish`); ``publish_only``: those alone."""
    publish = measure_publish(versions=publish_versions)
    if publish_only:
        return publish
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
    result.update({k: v for k, v in publish.items() if k not in ("machine", "date", "definitions")})
    result["definitions"] = {**result.get("definitions", {}), **publish["definitions"]}
    result.setdefault("machine", publish["machine"])
    result.setdefault("date", publish["date"])
    return result


def print_table(result: dict[str, Any]) -> None:
    """People's view of :func:`run`'s result."""
    if "learner_tokens_per_s" in result:
        queue_bench.print_table(result)
        print(f"  learner   {result['learner_tokens_per_s']:>9.1f} tokens/s")
    mb = result["publish_file_bytes"] / 1e6
    print(f"  publish   {mb:.1f} MB to 1 replica, median of {result['publish_versions']}")
    for label, key, ratio in (
        ("path", "publish_s", "publish_vs_copy_ratio"),
        ("stream", "publish_stream_s", "stream_vs_copy_ratio"),
    ):
        print(f"    {label:<6}  {result[key]:>9.3f} s  ({result[ratio]:g}x copy)")
    print(f"    copy    {result['copy_s']:>9.4f} s")
