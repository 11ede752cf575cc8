"""``axpo bench rollout``: the agent loop's wall time per batch of questions, GRPO against AXPO.

The verifier, tool and inference services run as subprocesses (``axpo serve ...`` through
:class:`axpo.local.processes.Processes`, with the ``run:`` settings of
``configs/tiny-cpu-axpo.yaml``: tools zoom 4096..16384 pixels and python off, inference
``max_model_len`` 2048). The loop runs
in this process over gRPC (:class:`~axpo_rollout.clients.GrpcBackend`), as a rollout worker
does, minus the queue.

Two :class:`~axpo_rollout.agent.AgentLoop` s are built from that job spec, one with
``algorithm.name: grpo`` and one with ``axpo`` (same ``group_size``, ``rho`` and everything
else), and the same engine sampling seed. Both answer the same ``questions`` zoom-digit
questions (task seeds ``seed .. seed+questions-1``), ``rollout.inflight_questions`` at a time
(a thread pool of ``run_group`` calls, as the worker keeps them in flight). One warm-up group
per loop (task seed ``seed+questions``) runs before timing. AXPO's batch is timed first: GRPO's
batch then finds the same prompts in vLLM's prefix cache, so the AXPO/GRPO ratio is if
anything overstated. The AXPO loop runs as the job configures it (``speculative_resampling``
off by default); a third batch, AXPO with speculative resampling on (resumes started from the
first turns, cancelled when a tool user is correct), runs last for comparison.

Model: ``--model DIR``; else the job's warm-started tiny model
(``.cache/models/tiny-qwen3-vl-warm``, built by ``axpo run configs/tiny-cpu-axpo.yaml``) when
it exists; else a random tiny model built in the temporary run folder, which rarely calls a
tool, so AXPO rarely resamples: ``tool_call_rate`` and ``resampled_groups_share`` say how much
of AXPO's extra work the figures contain.
"""

from __future__ import annotations

import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from axpo.algorithm.diagnostics import model_tokens
from axpo.contracts.domain import (
    Group,
    Image,
    Reward,
    RewardWeights,
    Sample,
    SamplingParams,
    ScoreItem,
    SegmentKind,
    ToolCall,
    ToolResult,
    Trajectory,
)
from axpo.settings.job import JobSpec, load_job_spec
from axpo.study.tasks import Task, generate_task
from axpo_rollout.agent import AgentLoop, Backend, CancelToken, Vocab
from axpo_rollout.services import local_services
from axpo_rollout.worker import QuestionSlots

__all__ = ["DEFINITIONS", "print_table", "run"]

CONFIG = "configs/tiny-cpu-axpo.yaml"

DEFINITIONS = {
    "grpo_step_s": "wall seconds for one batch of `questions` questions through the GRPO loop, "
    "rollout.inflight_questions questions sampling at a time, as a rollout worker places them "
    "(after one warm-up group)",
    "axpo_step_s": "the same for the AXPO loop (same questions, same sampling seed); timed "
    "before GRPO, so GRPO reuses vLLM's prefix cache of the same prompts",
    "axpo_vs_grpo_ratio": "axpo_step_s / grpo_step_s (floor: <= 1.35)",
    "axpo_speculative_step_s": "the AXPO loop with algorithm.speculative_resampling on "
    "(resumes start from the first turns, while the originals run), same questions and seed, "
    "timed last",
    "axpo_speculative_vs_grpo_ratio": "axpo_speculative_step_s / grpo_step_s",
    "speculative_resumes": "the speculative loop's early ResumeFromPrefix calls in the timed "
    "batches (all rounds): launched, used (the condition held) and cancelled (a tool user was "
    "correct)",
    "rounds": "each loop ran its batch this many times, the loops interleaved (AXPO, GRPO, "
    "speculative AXPO per round); every *_step_s is that loop's fastest batch (shared machine)",
    "axpo_vs_grpo_ratio_by_round": "axpo / grpo wall time of each round's two batches",
    "axpo_vs_grpo_token_ratio": "tokens the model sampled in AXPO's batch (originals + kept "
    "resamples, frozen prefixes not counted) / in GRPO's: the work ratio an engine with no "
    "spare batch capacity cannot beat",
    "speculative_waste_share": "cancelled / launched speculative resumes: work started for "
    "groups that turned out not to need it (aborted when the condition failed)",
    "trajectories_per_s": "GRPO trajectories (questions x group_size) / grpo_step_s",
    "axpo_trajectories_per_s": "AXPO trajectories (originals + resampled) / axpo_step_s",
    "tool_call_rate": "share of GRPO's original rollouts with >= 1 tool call (malformed calls "
    "included, as in axpo.algorithm.diagnostics)",
    "resampled_groups_share": "share of AXPO's timed groups that got >= 1 resampled rollout",
    "loop_overhead_share": "mean over the timed groups of both loops of 1 - (wall time during "
    "which at least one service call of the group was in flight) / group wall time: the "
    "share of a group's critical path spent in the loop itself (tokenizing, parsing, "
    "threads, GIL), not waiting on generate, resume, tools or the verifier",
    "loop_overhead_share_simple": "mean over the timed groups of "
    "max(0, 1 - (generate + tools + verify) / total) from Group.timings; generate and tools "
    "are summed over a group's rollout threads, so overlap makes this an underestimate",
    "first_turns_identical_share": "share of original rollouts whose first assistant turn "
    "has the same tokens under GRPO and AXPO (same question, same index, same seed)",
    "originals_identical_share": "share of original rollouts identical token for token "
    "under GRPO and AXPO",
}


# --------------------------------------------------------------------------- measuring


@dataclass
class _Calls:
    """Service-call intervals, attributed to a group by its question image (generate, resume,
    tools: the question image is always the first one sent) or by thread (score: run on the
    group's own thread)."""

    by_image: dict[str, str] = field(default_factory=dict)
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    local: threading.local = field(default_factory=threading.local)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str | None, start: float, end: float) -> None:
        if key is None:
            return
        with self.lock:
            self.intervals.setdefault(key, []).append((start, end))

    def key_for(self, images: Sequence[Image]) -> str | None:
        return self.by_image.get(images[0].sha256) if images else None


class _TimedBackend:
    """Delegates to the real backend and records when each call was in flight."""

    def __init__(self, inner: Backend, calls: _Calls) -> None:
        self.inner = inner
        self.calls = calls

    @contextmanager
    def _in_flight(self, key: Callable[[], str | None]) -> Iterator[None]:
        """Record the call's interval under ``key()`` (looked up once the call is over)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.calls.add(key(), t0, time.perf_counter())

    def generate(
        self,
        prompt: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        with self._in_flight(lambda: self.calls.key_for(images)):
            return self.inner.generate(prompt, images, sampling, cancel=cancel)

    def resume(
        self,
        prompt: Sequence[int],
        prefix: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        with self._in_flight(lambda: self.calls.key_for(images)):
            return self.inner.resume(prompt, prefix, images, sampling, cancel=cancel)

    def call_tool(self, call: ToolCall, images: Sequence[Image], timeout_s: float) -> ToolResult:
        with self._in_flight(lambda: self.calls.key_for(images)):
            return self.inner.call_tool(call, images, timeout_s)

    def score(self, items: Sequence[ScoreItem], weights: RewardWeights) -> list[Reward]:
        with self._in_flight(lambda: getattr(self.calls.local, "key", None)):
            return self.inner.score(items, weights)


def _union_s(intervals: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[lo, hi]``."""
    total = 0.0
    end = lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


@dataclass
class _Batch:
    groups: list[Group]
    wall_s: float
    overhead: list[float]  # per group, critical-path definition
    overhead_simple: list[float]  # per group, from Group.timings


def _run_batch(
    loop: AgentLoop, tasks: Sequence[Task], calls: _Calls, label: str, inflight: int
) -> _Batch:
    """``tasks`` through ``loop`` with a rollout worker's places (QuestionSlots: ``inflight``
    sampling, the job's ``resampling_questions`` more waiting on resamples), in order."""
    windows: dict[str, tuple[float, float]] = {}
    slots = QuestionSlots(inflight, loop.spec.rollout.resampling_slots())
    order = threading.Lock()

    def one(task: Task) -> Group:
        key = f"{label}-{task.task_id}"
        for image in task.images:
            calls.by_image[image.sha256] = key
        calls.local.key = key
        with order:  # questions take places in task order
            ticket = slots.start()
        assert ticket is not None
        t0 = time.perf_counter()
        try:
            return loop.run_group(task, group_id=key, on_resampling=ticket.resampling)
        finally:
            ticket.done()
            windows[key] = (t0, time.perf_counter())
            calls.local.key = None

    start = time.perf_counter()
    with ThreadPoolExecutor(slots.total_cap, thread_name_prefix=f"bench-{label}") as pool:
        groups = list(pool.map(one, tasks))
    wall = time.perf_counter() - start
    overhead, simple = [], []
    for g in groups:
        lo, hi = windows[g.group_id]
        busy = _union_s(calls.intervals.get(g.group_id, []), lo, hi)
        overhead.append(max(0.0, 1.0 - busy / (hi - lo)))
        t = dict(g.timings)
        simple.append(max(0.0, 1.0 - (t["generate"] + t["tools"] + t["verify"]) / t["total"]))
    return _Batch(groups, wall, overhead, simple)


def _originals(group: Group) -> list[Trajectory]:
    return [t for t in group.trajectories if not t.resampled_from]


def _first_turn(t: Trajectory) -> tuple[int, ...]:
    end = next(
        (s.start for s in t.segments if s.kind == SegmentKind.TOOL_RESPONSE), len(t.token_ids)
    )
    return t.token_ids[t.prompt_length : end]


def _generated(trajectories: Sequence[Trajectory]) -> int:
    """Tokens the model sampled, a resample's frozen prefix not counted (as the diagnostics'
    resample token share counts them)."""
    return sum(model_tokens(t) for t in trajectories)


def _share(hits: int, total: int) -> float:
    return round(hits / total, 4) if total else 0.0


# --------------------------------------------------------------------------- the bench


def _config_path() -> Path:
    import axpo

    for root in (Path(axpo.__file__).resolve().parent.parent, Path.cwd()):
        if (root / CONFIG).is_file():
            return root / CONFIG
    raise FileNotFoundError(f"{CONFIG} not found (run from the repository root)")


def _loop_spec(spec: JobSpec, name: str, group_size: int, model: Path, **algorithm: Any) -> JobSpec:
    alg = spec.algorithm.model_copy(update={"name": name, "group_size": group_size, **algorithm})
    return spec.model_copy(update={"algorithm": alg, "model": str(model)})


def run(
    model_dir: Path | None = None,
    questions: int = 32,
    group_size: int = 4,
    seed: int = 0,
    rounds: int = 1,
) -> dict[str, Any]:
    """Start the services, time the loops on the same questions (``rounds`` times, the loops
    interleaved; each loop's fastest batch is reported), stop everything."""
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    config = _config_path()
    spec = load_job_spec(config)
    warm = config.parent.parent / spec.model
    with tempfile.TemporaryDirectory(prefix="axpo-rollout-bench-") as tmp:
        run_dir = Path(tmp)
        if model_dir is not None:
            model, model_name = Path(model_dir).resolve(), str(model_dir)
        elif warm.is_dir():
            model = warm.resolve()
            model_name = f"tiny Qwen3-VL, warm-started ({spec.model})"
        else:
            from axpo.study.tiny_model import build_tiny_model

            model = build_tiny_model(run_dir / "tiny", seed=0)
            model_name = "tiny Qwen3-VL, random init (axpo model tiny, seed 0; no warm start found)"
        with local_services(spec, model, run_dir) as services:
            startup_s = services.startup_s
            backend = services.backend
            calls = _Calls()
            timed = _TimedBackend(backend, calls)
            vocab = Vocab(model)
            tool_specs = backend.list_tools()
            grpo = AgentLoop(
                timed, vocab, _loop_spec(spec, "grpo", group_size, model), tool_specs, seed=seed
            )
            axpo = AgentLoop(
                timed, vocab, _loop_spec(spec, "axpo", group_size, model), tool_specs, seed=seed
            )
            speculative = AgentLoop(
                timed,
                vocab,
                _loop_spec(
                    spec,
                    "axpo",
                    group_size,
                    model,
                    speculative_resampling=True,
                    tool_call_anchor="first",
                ),
                tool_specs,
                seed=seed,
            )
            size = spec.tasks.image_size
            families = spec.tasks.family_names()
            tasks = [
                generate_task(families[i % len(families)], seed=seed + i, image_size=size)
                for i in range(questions)
            ]
            warmup = generate_task(families[0], seed + questions, size)
            inflight = spec.rollout.inflight_questions
            _run_batch(grpo, [warmup], calls, "warmup-grpo", 1)
            _run_batch(axpo, [warmup], calls, "warmup-axpo", 1)
            _run_batch(speculative, [warmup], calls, "warmup-axpo-speculative", 1)
            batches: dict[str, list[_Batch]] = {"axpo": [], "grpo": [], "spec": []}
            before = replace(speculative.speculation)
            for r in range(rounds):
                batches["axpo"].append(_run_batch(axpo, tasks, calls, f"axpo-{r}", inflight))
                batches["grpo"].append(_run_batch(grpo, tasks, calls, f"grpo-{r}", inflight))
                batches["spec"].append(
                    _run_batch(speculative, tasks, calls, f"axpo-speculative-{r}", inflight)
                )
            launched = speculative.speculation.launched - before.launched
            used = speculative.speculation.used - before.used
            cancelled = speculative.speculation.cancelled - before.cancelled
            a, g, q = (min(batches[k], key=lambda b: b.wall_s) for k in ("axpo", "grpo", "spec"))

    grpo_trajs = [t for grp in g.groups for t in grp.trajectories]
    axpo_trajs = [t for grp in a.groups for t in grp.trajectories]
    pairs = [
        (x, y)
        for gg, ag in zip(g.groups, a.groups, strict=True)
        for x, y in zip(_originals(gg), _originals(ag), strict=True)
    ]
    resampled = sum(1 for grp in a.groups if any(t.resampled_from for t in grp.trajectories))
    overhead = g.overhead + a.overhead
    simple = g.overhead_simple + a.overhead_simple
    return {
        "model": model_name,
        "questions": questions,
        "group_size": group_size,
        "inflight_questions": inflight,
        "seed": seed,
        "rounds": rounds,
        "axpo_vs_grpo_ratio_by_round": [
            round(x.wall_s / y.wall_s, 3)
            for x, y in zip(batches["axpo"], batches["grpo"], strict=True)
        ],
        "grpo_step_s": round(g.wall_s, 3),
        "axpo_step_s": round(a.wall_s, 3),
        "axpo_vs_grpo_ratio": round(a.wall_s / g.wall_s, 3),
        "axpo_speculative_step_s": round(q.wall_s, 3),
        "axpo_speculative_vs_grpo_ratio": round(q.wall_s / g.wall_s, 3),
        "speculative_resumes": {"launched": launched, "used": used, "cancelled": cancelled},
        "speculative_waste_share": _share(cancelled, launched),
        "grpo_generated_tokens": _generated(grpo_trajs),
        "axpo_generated_tokens": _generated(axpo_trajs),
        "axpo_vs_grpo_token_ratio": round(
            _generated(axpo_trajs) / max(1, _generated(grpo_trajs)), 3
        ),
        "trajectories_per_s": round(len(grpo_trajs) / g.wall_s, 2),
        "axpo_trajectories_per_s": round(len(axpo_trajs) / a.wall_s, 2),
        "axpo_resampled_rollouts": sum(1 for t in axpo_trajs if t.resampled_from),
        "tool_call_rate": _share(sum(1 for t in grpo_trajs if t.tool_calls), len(grpo_trajs)),
        "axpo_tool_call_rate": _share(
            sum(1 for grp in a.groups for t in _originals(grp) if t.tool_calls),
            sum(len(_originals(grp)) for grp in a.groups),
        ),
        "resampled_groups_share": _share(resampled, len(a.groups)),
        "loop_overhead_share": round(sum(overhead) / len(overhead), 4),
        "grpo_loop_overhead_share": round(sum(g.overhead) / len(g.overhead), 4),
        "axpo_loop_overhead_share": round(sum(a.overhead) / len(a.overhead), 4),
        "loop_overhead_share_simple": round(sum(simple) / len(simple), 4),
        "first_turns_identical_share": _share(
            sum(1 for x, y in pairs if _first_turn(x) == _first_turn(y)), len(pairs)
        ),
        "originals_identical_share": _share(
            sum(1 for x, y in pairs if x.token_ids == y.token_ids), len(pairs)
        ),
        "services_startup_s": round(startup_s, 1),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "definitions": DEFINITIONS,
    }


def print_table(result: dict[str, Any]) -> None:
    """People's view of :func:`run`'s result."""
    r = result
    print(
        f"rollout loop over gRPC: {r['questions']} questions x G={r['group_size']}, "
        f"{r['inflight_questions']} in flight; model: {r['model']}"
    )
    print(
        f"  GRPO batch        : {r['grpo_step_s']:8.2f} s  ({r['trajectories_per_s']:.2f} traj/s)"
    )
    print(
        f"  AXPO batch        : {r['axpo_step_s']:8.2f} s  "
        f"({r['axpo_trajectories_per_s']:.2f} traj/s, {r['axpo_resampled_rollouts']} resampled)"
    )
    print(f"  AXPO / GRPO       : {r['axpo_vs_grpo_ratio']:8.3f}  (floor <= 1.35)")
    sr = r["speculative_resumes"]
    print(
        f"  speculative resumes: {sr['launched']} launched, {sr['used']} used, "
        f"{sr['cancelled']} cancelled; speculative AXPO / GRPO: "
        f"{r['axpo_speculative_vs_grpo_ratio']:.3f}"
    )
    print(f"  tool-call rate    : {r['tool_call_rate']:8.3f}")
    print(f"  resampled groups  : {r['resampled_groups_share']:8.3f}")
    print(
        f"  loop overhead     : {r['loop_overhead_share']:8.3f}  "
        f"(simple formula {r['loop_overhead_share_simple']:.3f})"
    )
    print(
        f"  same first turns  : {r['first_turns_identical_share']:8.3f}  "
        f"(whole originals {r['originals_identical_share']:.3f})"
    )
