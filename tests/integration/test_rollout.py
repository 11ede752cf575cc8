"""Rollout workers with real services on the tiny model: a few GRPO and AXPO steps.

Everything is real and in-process where it can be: the vLLM CPU engine behind the inference
gRPC server, the tool server (zoom), the verifier server, a private redis-server, the learner
loop (trainer, checkpoints, weight publication to the inference service by path) and a rollout
worker with its gRPC clients. The model is the tiny checkpoint after a short warm start
(``axpo_learner.warmstart``), so it writes the format and calls the zoom tool on part of its
rollouts.

Checked: groups reach the learner; weights are published and picked up (trajectories sampled
after a publication carry the new version); AXPO resamples exactly when its condition holds
(and it holds in at least one group), with rho, anchor and counts from the job spec,
with the frozen prefix token-identical to the original; the learner's per-step diagnostics
match a recount from the groups it trained on.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from axpo.algorithm import selection
from axpo.contracts.domain import Group, SegmentKind
from axpo.queue import PromptTask, TrajectoryQueue
from axpo.queue.redis_server import RedisServer
from axpo.settings.base import RpcClientSettings, RpcServerSettings
from axpo.settings.inference import InferenceSettings
from axpo.settings.job import DEFAULT_SYSTEM_PROMPT, JobSpec, TaskSpec, load_job_spec
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo.settings.tools import ToolsSettings, ZoomSettings
from axpo.settings.verifier import VerifierSettings
from axpo.study.tasks import task_data
from axpo.study.tiny_model import build_tiny_model
from axpo_inference import server as inference_server
from axpo_inference.engine import InferenceEngine
from axpo_learner.loop import LearnerLoop
from axpo_learner.publish import PathPublisher
from axpo_learner.trainer import Trainer
from axpo_rollout.agent import AgentLoop, Vocab
from axpo_rollout.clients import GrpcBackend
from axpo_rollout.worker import RolloutWorker
from axpo_tools import server as tools_server
from axpo_tools.toolbox import Toolbox
from axpo_verifier import server as verifier_server
from axpo_verifier.verifier import Verifier

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RPC = RpcServerSettings(host="127.0.0.1", port=0, log_requests=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from axpo.settings.job import DEFAULT_SYSTEM_PROMPT, TaskSpec
    from axpo_learner import warmstart

    root = tmp_path_factory.mktemp("rollout")
    base = build_tiny_model(root / "base", seed=0)
    toolbox = Toolbox(_tools_settings())
    try:
        tools = [s for s in toolbox.openai_specs() if s["function"]["name"] == warmstart.ZOOM_TOOL]
        warmstart.warm_start(
            base,
            root / "warm",
            tools=tools,
            call_tool=lambda call, images: toolbox.call(call, images),
            tasks=TaskSpec(image_size=128, count=64),
            system_prompt=DEFAULT_SYSTEM_PROMPT,
            steps=80,
            # Most demonstrations call the tool, so every run has tool-using rollouts (at 0.5
            # and 60 steps a CI run once sampled none) and all-wrong tool subgroups are common.
            tool_rate=0.9,
            seed=0,
        )
    finally:
        toolbox.close()
    return root / "warm"


def _tools_settings() -> ToolsSettings:
    return ToolsSettings(
        rpc=RPC, zoom=ZoomSettings(min_pixels=4096, max_pixels=16384), python={"enabled": False}
    )


@dataclass
class Services:
    inference: str
    tools: str
    verifier: str
    engine: InferenceEngine


@pytest.fixture(scope="module")
def services(model_dir: Path) -> Iterator[Services]:
    settings = InferenceSettings(model=str(model_dir), max_model_len=2048, rpc=RPC)
    toolbox = Toolbox(_tools_settings())
    toolbox.start()
    with InferenceEngine(settings) as engine, Verifier(VerifierSettings(rpc=RPC)) as verifier:
        running = [
            inference_server.start(settings, engine),
            tools_server.start(_tools_settings(), toolbox),
            verifier_server.start(VerifierSettings(rpc=RPC), verifier),
        ]
        try:
            yield Services(*(r.address for r in running), engine=engine)  # type: ignore[misc]
        finally:
            for r in running:
                r.stop(1)
            toolbox.close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(str(tmp_path_factory.mktemp("redis"))) as server:
        yield server.url


class RecordingTrainer(Trainer):
    """The real trainer, keeping the groups of every step (to recount the diagnostics)."""

    steps_groups: list[list[Group]]

    def train_step(self, groups: Any) -> dict[str, float]:
        self.steps_groups.append(list(groups))
        return super().train_step(groups)


def _job(name: str, algorithm_name: str, model_dir: Path) -> JobSpec:
    spec = load_job_spec(REPO / "configs" / "tiny-cpu-axpo.yaml")
    return spec.model_copy(
        update={
            "name": name,
            "model": str(model_dir),
            "steps": 3,
            "questions_per_step": 2,
            "algorithm": spec.algorithm.model_copy(
                # Speculation on (the default is off): the real engine exercises cancelling.
                update={"name": algorithm_name, "group_size": 4, "speculative_resampling": True}
            ),
            # The model is warm-started on zoom_digits with the zoom tool and the default
            # system prompt (model_dir): the job asks the same of it.
            "tasks": TaskSpec(family="zoom_digits", image_size=128, count=256),
            "rollout": spec.rollout.model_copy(
                update={
                    "max_new_tokens": 128,
                    "inflight_questions": 1,
                    "tools": ["image_zoom_in_tool"],
                    "system_prompt": DEFAULT_SYSTEM_PROMPT,
                    "max_total_tokens": 1024,
                }
            ),
        }
    )


def _train(
    spec: JobSpec, services: Services, redis_url: str, tmp: Path
) -> tuple[list[dict[str, float]], list[list[Group]], list[Group], AgentLoop]:
    """Run one job: a learner loop and a rollout worker on threads until ``spec.steps``."""
    queue_settings = QueueSettings(
        redis_url=redis_url, block_ms=200, max_backlog=2, backpressure_timeout_s=5
    )
    import redis

    client = redis.Redis.from_url(redis_url)
    queue = TrajectoryQueue(client, spec.name, queue_settings)
    queue.ensure()
    learner_settings = LearnerSettings(
        model=spec.model,
        lr=1e-3,
        checkpoint_dir=str(tmp / "ckpt"),
        checkpoint_every=1,
        max_policy_lag=2,
    )
    trainer = RecordingTrainer(learner_settings, spec.algorithm)
    trainer.steps_groups = []
    # The engine is shared by the tests: serve the warm-started weights again, at a version
    # above whatever an earlier test published, and start the learner from that version.
    start_version = services.engine.policy_version + 1
    services.engine.load_weights_from_path(spec.model, start_version)
    trainer.policy_version = start_version
    publisher = PathPublisher(
        [RpcClientSettings(target=services.inference, deadline_s=300)], tmp / "publish"
    )
    records: list[dict[str, float]] = []
    loop = LearnerLoop(learner_settings, spec, queue, trainer, publisher, on_step=records.append)
    backend = GrpcBackend(
        RpcClientSettings(target=services.inference, deadline_s=300),
        RpcClientSettings(target=services.tools),
        RpcClientSettings(target=services.verifier),
    )
    produced: list[Group] = []
    # The job's sampling seed, so the first groups (warm-started weights) are the same in every
    # run: with random seeds, AXPO's condition held in as few as 1 of 8 groups (4-5 with it).
    agent = AgentLoop(backend, Vocab(spec.model), spec, backend.list_tools(), seed=spec.seed)
    original_run_group = agent.run_group

    def recording_run_group(task: Any, **kw: Any) -> Group:
        group = original_run_group(task, **kw)
        produced.append(group)
        return group

    agent.run_group = recording_run_group  # type: ignore[method-assign]
    worker = RolloutWorker(agent, queue, "rollout-0")
    queue.put_prompts(
        [
            PromptTask(f"q{i}", f"q{i}", data=task_data(spec.tasks, i))
            for i in range(spec.steps * spec.questions_per_step + 8)
        ]
    )
    threads = [
        threading.Thread(target=worker.run, daemon=True),
        threading.Thread(target=loop.run, daemon=True),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 420
    while threads[1].is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    worker.request_stop()
    loop.request_stop()
    for t in threads:
        t.join(120)
    publisher.close()
    backend.close()
    client.close()
    assert loop.status().error == ""
    assert len(records) == spec.steps, "the learner did not finish its steps in time"
    return records, trainer.steps_groups, produced, agent


def _recount(groups: list[Group], version: int) -> dict[str, float]:
    originals = [t for g in groups for t in g.trajectories if not t.resampled_from]
    with_tools = [t for t in originals if t.tool_calls]
    resampled = {
        (g.group_id, t.resampled_from) for g in groups for t in g.trajectories if t.resampled_from
    }
    recovered = {
        (g.group_id, t.resampled_from)
        for g in groups
        for t in g.trajectories
        if t.resampled_from and t.reward is not None and t.reward.correct
    }
    all_wrong = [
        g
        for g in groups
        if any(t.tool_calls and not t.resampled_from for t in g.trajectories)
        and not any(
            t.tool_calls and not t.resampled_from and t.reward and t.reward.correct
            for t in g.trajectories
        )
    ]
    return {
        "groups": len(groups),
        "rollouts": len(originals),
        "tool_call_rate": len(with_tools) / len(originals),
        "all_wrong_tool_rate": len(all_wrong) / len(groups),
        "resampled_subgroups": len(resampled),
        "recovery_rate": len(recovered) / len(resampled) if resampled else 0.0,
        "accuracy": sum(bool(t.reward and t.reward.correct) for t in originals) / len(originals),
        "policy_lag_max": max(version - g.policy_version for g in groups),
    }


def _check_common(
    records: list[dict[str, float]],
    steps_groups: list[list[Group]],
    produced: list[Group],
    start: int,
) -> None:
    # Groups reached the learner: every trained group was produced by the worker.
    produced_ids = {g.group_id for g in produced}
    for step, (record, groups) in enumerate(zip(records, steps_groups, strict=True)):
        assert {g.group_id for g in groups} <= produced_ids
        recount = _recount(groups, version=start + step)
        for key, value in recount.items():
            assert record[key] == pytest.approx(value), (step, key)
    # Weights were published and picked up: the worker (one question in flight, at most two
    # groups ahead of the learner) sampled later groups on a published version.
    versions = {
        seg.policy_version
        for g in produced
        for t in g.trajectories
        for seg in t.segments
        if seg.kind in (SegmentKind.THINK, SegmentKind.TOOL_CALL, SegmentKind.ANSWER)
    }
    assert max(versions) >= start + 1, versions
    assert all(r["policy_lag_max"] <= 2 for r in records)
    assert records[-1]["policy_version"] == start + len(records)


def test_grpo_steps_never_resample(
    services: Services, redis_url: str, tmp_path: Path, model_dir: Path
) -> None:
    spec = _job("it-grpo", "grpo", model_dir)
    start = services.engine.policy_version + 1
    records, steps_groups, produced, _agent = _train(spec, services, redis_url, tmp_path)
    _check_common(records, steps_groups, produced, start)
    assert not any(t.resampled_from for g in produced for t in g.trajectories)
    assert all(r["resampled_rollouts"] == 0 for r in records)


def test_axpo_resamples_exactly_when_its_condition_holds(
    services: Services, redis_url: str, tmp_path: Path, model_dir: Path
) -> None:
    spec = _job("it-axpo", "axpo", model_dir)
    alg = spec.algorithm  # rho, anchor, uncertainty and counts as the job configures them
    start = services.engine.policy_version + 1
    records, steps_groups, produced, agent = _train(spec, services, redis_url, tmp_path)
    _check_common(records, steps_groups, produced, start)
    tool_rollouts = sum(bool(t.tool_calls) for g in produced for t in g.trajectories)
    assert tool_rollouts > 0, "the warm-started model never called the tool"
    triggered = [
        g.group_id
        for g in produced
        if selection.needs_resampling([t for t in g.trajectories if not t.resampled_from])
    ]
    # The warm start calls the tool in most demonstrations and the tiny model is mostly wrong,
    # so all-wrong tool subgroups are common: without one, nothing below would be checked.
    assert triggered, f"AXPO's condition held in none of the {len(produced)} groups"
    for g in produced:
        originals = [t for t in g.trajectories if not t.resampled_from]
        resamples = [t for t in g.trajectories if t.resampled_from]
        assert bool(resamples) == (g.group_id in triggered), g.group_id
        if not resamples:
            continue
        candidates = selection.prefix_candidates(
            originals, anchor=alg.tool_call_anchor, score=alg.uncertainty
        )
        kept = selection.select_prefixes(candidates, alg.rho)
        counts = selection.resample_counts(len(kept), alg.group_size, alg.resamples_per_prefix)
        # The kept prefixes, each resumed from its anchor call as many times as AXPO asks.
        expected = {
            (c.trajectory_id, c.prefix_length): k for c, k in zip(kept, counts, strict=True)
        }
        got = Counter((r.resampled_from, r.frozen_prefix_length) for r in resamples)
        assert got == expected, g.group_id
        by_id = {t.trajectory_id: t for t in originals}
        for r in resamples:
            parent = by_id[r.resampled_from]
            k = r.frozen_prefix_length
            assert r.token_ids[:k] == parent.token_ids[:k]
            assert r.logprobs[:k] == parent.logprobs[:k]
            calls = [s.start for s in parent.segments if s.kind == SegmentKind.TOOL_CALL]
            assert k in (calls[:1] if alg.tool_call_anchor == "first" else calls)
    # Speculative resampling (on in this job): every kept prefix was resumed from the first
    # turns, and every speculative resume was either kept or cancelled.
    spec_counts = agent.speculation
    assert spec_counts.used == sum(
        len({r.resampled_from for r in g.trajectories if r.resampled_from}) for g in produced
    )
    assert spec_counts.launched == spec_counts.used + spec_counts.cancelled
    print(
        f"AXPO triggered on {len(triggered)} of {len(produced)} groups; speculation {spec_counts}"
    )
