"""``axpo eval``: sample ``n`` rollouts per held-out question with a job's agent loop, through
the same services as training, and report pass@k, accuracy and tool use
(:mod:`axpo_rollout.evaluate_metrics` defines every figure).

Three layers, so each caller takes the one it has:

- :func:`evaluate`: an :class:`~axpo_rollout.agent.AgentLoop` built by :func:`eval_loop` (the
  job's loop, GRPO, ``group_size = n``: no AXPO resampling) and the questions; starts nothing.
  Questions run ``rollout.inflight_questions`` at a time, each on its own thread, so their
  generations batch in vLLM as a rollout worker's do.
- :func:`eval_running`: the same against services that already run (``host:port`` targets),
  e.g. at the end of a training run, on the weights the inference service serves now.
- :func:`run_eval`: starts verifier, tools and inference (``model_dir``) as local processes
  (:func:`axpo_rollout.services.local_services`), evaluates, stops them.

Nothing here depends on the tiny model: any checkpoint directory the inference service and
:class:`~axpo_rollout.agent.Vocab` load (``tokenizer.json`` with Qwen's tool-call tags) works.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axpo.contracts.domain import Group, ToolSpec
from axpo.settings.base import RpcClientSettings
from axpo.settings.job import JobSpec
from axpo.study import tasks
from axpo.study.tasks import Task
from axpo_rollout.agent import AgentLoop, Backend, Vocab
from axpo_rollout.evaluate_metrics import QuestionResult, check_ks, question_result, summarize

__all__ = [
    "MAX_N",
    "EvalArgumentError",
    "EvalResult",
    "eval_loop",
    "eval_questions",
    "eval_running",
    "evaluate",
    "run_eval",
    "write_jsonl",
]

MAX_N = 256
"""Most samples per question (the job spec's bound on ``group_size``)."""
HEALTH_TIMEOUT_S = 30.0
"""How long running services (:func:`eval_running`) may take to answer their health check."""


class _Skipped(Exception):
    """A question not started because an earlier one failed."""


class EvalArgumentError(ValueError):
    """An evaluation asked for something that cannot be done (the message says what); raised
    before any service starts."""


@dataclass(frozen=True)
class EvalResult:
    """Per-question results in question order, their summary, and the sampling wall time."""

    questions: tuple[QuestionResult, ...]
    ks: tuple[int, ...]
    summary: dict[str, Any]
    wall_s: float
    policy_versions: tuple[int, ...]
    """The distinct policy versions that wrote the samples (one after a clean evaluation)."""

    def records(self) -> list[dict[str, Any]]:
        """One JSON-able record per question (the lines of the per-question file)."""
        return [q.to_json(self.ks) for q in self.questions]


# --------------------------------------------------------------------------- arguments


def _check_n(n: int) -> None:
    if not 1 <= n <= MAX_N:
        raise EvalArgumentError(f"n must be in [1, {MAX_N}] samples per question, got {n}")


def eval_questions(families: Sequence[str], split: str, count: int, image_size: int) -> list[Task]:
    """``count`` questions of each family from ``split`` (:func:`axpo.study.tasks.tasks_for`:
    the same seeds for every family, interleaved). Raises :class:`EvalArgumentError` naming an
    unknown family or split, or a count below 1."""
    known = tasks.families()
    unknown = [f for f in families if f not in known]
    if not families or unknown:
        raise EvalArgumentError(
            f"unknown task families {unknown or '(none given)'}; known: {', '.join(known)}"
        )
    if len(set(families)) != len(families):
        raise EvalArgumentError(f"task families {list(families)} name a family twice")
    if split not in tasks.SPLITS:
        raise EvalArgumentError(f"unknown split {split!r}; known: {', '.join(tasks.SPLITS)}")
    if count < 1:
        raise EvalArgumentError(f"questions per family must be >= 1, got {count}")
    try:
        return tasks.tasks_for(families, split, count, image_size)
    except ValueError as exc:
        raise EvalArgumentError(str(exc)) from exc


def eval_spec(spec: JobSpec, n: int, *, temperature: float | None = None) -> JobSpec:
    """``spec`` set to sample ``n`` rollouts per question with plain group sampling (GRPO: no
    AXPO resampling) and, if given, another sampling temperature. Everything else (system
    prompt, tools, turns, token budgets) stays the job's."""
    _check_n(n)
    if temperature is not None and not temperature > 0:
        raise EvalArgumentError(f"temperature must be > 0, got {temperature}")
    # model_copy does not validate: n may be 1 here (training needs group_size >= 2).
    algorithm = spec.algorithm.model_copy(
        update={"name": "grpo", "group_size": n, "speculative_resampling": False}
    )
    rollout = spec.rollout
    if temperature is not None:
        rollout = rollout.model_copy(update={"temperature": temperature})
    return spec.model_copy(update={"algorithm": algorithm, "rollout": rollout})


def eval_loop(
    backend: Backend,
    tool_specs: Sequence[ToolSpec],
    spec: JobSpec,
    n: int,
    *,
    vocab: Vocab | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> AgentLoop:
    """The job's agent loop, sampling ``n`` rollouts per question without resampling
    (:func:`eval_spec`). ``vocab`` defaults to the tokenizer of ``spec.model``; ``tool_specs``
    are the tool server's (``GrpcBackend.list_tools``).

    ``seed`` (default None: the engine's own random stream) is sent with every generation
    request. Leave it unset for an evaluation: vLLM seeds each request's sampler with it, so
    every question's first turns, and every later turn of every rollout, draw the same random
    numbers; samples are then correlated across questions and across a question's rollouts
    after a tool call (measured: the tiny model wrote the same four samples for 12 different
    questions), which pass@k, assuming independent samples, does not allow for.
    """
    espec = eval_spec(spec, n, temperature=temperature)
    return AgentLoop(backend, vocab or Vocab(spec.model), espec, tool_specs, seed=seed)


# --------------------------------------------------------------------------- evaluating


def evaluate(
    loop: AgentLoop,
    questions: Sequence[Task],
    ks: Sequence[int],
    *,
    inflight: int | None = None,
    on_question: Callable[[QuestionResult], object] | None = None,
) -> EvalResult:
    """Sample every question's group with ``loop`` (from :func:`eval_loop`;
    ``n = loop.spec.algorithm.group_size``), ``inflight`` questions at a time (default
    ``rollout.inflight_questions``), and summarize. ``on_question`` is called with each
    question's result as it finishes (any order).

    Raises :class:`EvalArgumentError` for a loop that resamples, no questions or a bad k;
    RuntimeError naming the question when sampling one fails (questions not yet started are
    skipped; those in flight finish first).
    """
    alg = loop.spec.algorithm
    if alg.name != "grpo":
        raise EvalArgumentError(
            f"evaluate needs a loop without resampling (eval_loop), got algorithm {alg.name!r}"
        )
    n = alg.group_size
    try:
        kept = check_ks(ks, n)
    except ValueError as exc:
        raise EvalArgumentError(str(exc)) from exc
    if not questions:
        raise EvalArgumentError("no questions to evaluate")
    ids = [q.task_id for q in questions]
    if len(set(ids)) != len(ids):
        raise EvalArgumentError("the questions repeat a task_id")
    workers = inflight if inflight is not None else loop.spec.rollout.inflight_questions
    if workers < 1:
        raise EvalArgumentError(f"inflight must be >= 1, got {workers}")

    failed = threading.Event()

    def one(task: Task) -> tuple[QuestionResult, Group]:
        if failed.is_set():  # a question failed: start no more
            raise _Skipped
        try:
            group = loop.run_group(task, group_id=f"eval-{task.task_id}")
            result = question_result(task, group)
            if on_question is not None:
                on_question(result)
        except BaseException:
            failed.set()
            raise
        return result, group

    started = time.perf_counter()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="eval")
    futures: list[Future[tuple[QuestionResult, Group]]] = [pool.submit(one, q) for q in questions]
    done: list[tuple[QuestionResult, Group]] = []
    try:
        for task, fut in zip(questions, futures, strict=True):
            try:
                done.append(fut.result())
            except Exception as exc:
                raise RuntimeError(f"evaluating {task.task_id} failed: {exc}") from exc
    except BaseException:
        # A failure or Ctrl-C: start nothing more and do not wait for the groups in flight
        # (they end when the caller stops the services).
        failed.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    wall_s = time.perf_counter() - started
    results = tuple(r for r, _ in done)
    versions = sorted({g.policy_version for _, g in done})
    return EvalResult(results, kept, summarize(results, kept), wall_s, tuple(versions))


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``records`` one JSON object per line, atomically (a temporary file renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _report(
    result: EvalResult, spec: JobSpec, model: str, split: str, out_path: Path | None
) -> dict[str, Any]:
    """The summary line: metrics first, then what was evaluated and how."""
    if out_path is not None:
        write_jsonl(out_path, result.records())
    rollouts = result.summary["rollouts"]
    return {
        **result.summary,
        "model": model,
        "split": split,
        "ks": list(result.ks),
        "temperature": spec.rollout.temperature,
        "tools": list(spec.rollout.tools),
        "policy_versions": list(result.policy_versions),
        "wall_s": round(result.wall_s, 2),
        "rollouts_per_s": round(rollouts / result.wall_s, 3) if result.wall_s > 0 else None,
        "out": str(out_path) if out_path is not None else None,
    }


def _check_model(path: Path) -> Path:
    """``path`` if it is a checkpoint directory with a tokenizer, else EvalArgumentError."""
    if not path.is_dir():
        raise EvalArgumentError(f"model directory {path} does not exist")
    if not (path / "tokenizer.json").is_file():
        raise EvalArgumentError(f"{path}: no tokenizer.json (not a model checkpoint?)")
    return path


@dataclass(frozen=True)
class _Plan:
    """What to evaluate: the questions, samples per question, the ks, the temperature."""

    families: tuple[str, ...]
    split: str
    questions: int
    n: int
    ks: tuple[int, ...]
    temperature: float | None

    def check(self, spec: JobSpec) -> None:
        """Every argument error, before a service starts."""
        _check_n(self.n)
        try:
            check_ks(self.ks, self.n)
        except ValueError as exc:
            raise EvalArgumentError(str(exc)) from exc
        if self.questions < 1:
            raise EvalArgumentError(f"questions per family must be >= 1, got {self.questions}")
        eval_questions(self.families, self.split, 1, spec.tasks.image_size)
        eval_spec(spec, self.n, temperature=self.temperature)


def _with_backend(
    backend: Any,
    spec: JobSpec,
    model: str,
    plan: _Plan,
    out_path: Path | None,
    on_question: Callable[[QuestionResult], object] | None,
) -> dict[str, Any]:
    """Build the loop on ``backend`` (a GrpcBackend: it lists the tools), evaluate, report."""
    loop = eval_loop(
        backend,
        backend.list_tools(),
        spec,
        plan.n,
        vocab=Vocab(model),
        temperature=plan.temperature,
    )
    try:
        questions = eval_questions(plan.families, plan.split, plan.questions, spec.tasks.image_size)
        result = evaluate(loop, questions, plan.ks, on_question=on_question)
    finally:
        loop.pool.shutdown(wait=False)
    return _report(result, loop.spec, model, plan.split, out_path)


def eval_running(
    inference: str,
    tools: str,
    verifier: str,
    spec: JobSpec,
    *,
    families: Sequence[str],
    split: str = "heldout",
    questions: int = 32,
    n: int = 8,
    ks: Sequence[int] = (1, 4),
    out_path: Path | None = None,
    temperature: float | None = None,
    tokenizer: str | Path | None = None,
    on_question: Callable[[QuestionResult], object] | None = None,
) -> dict[str, Any]:
    """Evaluate on services that already run (``host:port`` targets): whatever weights the
    inference service holds now. ``tokenizer`` (a checkpoint directory) defaults to
    ``spec.model``. Returns the summary line (:func:`run_eval`, without ``startup_s``)."""
    from axpo_rollout.clients import GrpcBackend
    from axpo_rollout.services import INFERENCE_DEADLINE_S, SERVICE_DEADLINE_S

    plan = _Plan(tuple(families), split, questions, n, tuple(ks), temperature)
    plan.check(spec)
    tokenizer = _check_model(Path(tokenizer or spec.model))
    backend = GrpcBackend(
        RpcClientSettings(target=inference, deadline_s=INFERENCE_DEADLINE_S),
        RpcClientSettings(target=tools, deadline_s=SERVICE_DEADLINE_S),
        RpcClientSettings(target=verifier, deadline_s=SERVICE_DEADLINE_S),
    )
    try:
        backend.wait_ready(HEALTH_TIMEOUT_S)
        return _with_backend(backend, spec, str(tokenizer), plan, out_path, on_question)
    finally:
        backend.close()


def run_eval(
    model_dir: Path,
    spec: JobSpec,
    families: Sequence[str],
    split: str,
    questions: int,
    n: int,
    ks: Sequence[int],
    out_path: Path | None = None,
    *,
    temperature: float | None = None,
    run_dir: Path | None = None,
    on_question: Callable[[QuestionResult], object] | None = None,
) -> dict[str, Any]:
    """Start verifier, tools and inference serving ``model_dir`` with ``spec``'s settings,
    evaluate ``questions`` questions of each family of ``split`` (``n`` samples each, pass@k
    for every k in ``ks``), write the per-question records to ``out_path`` (JSON lines) when
    given, stop the services, and return the summary line: the overall figures, ``families``
    with the same per family, then ``model``, ``split``, ``ks``, ``temperature``, ``tools``,
    ``policy_versions``, ``wall_s`` (sampling only), ``rollouts_per_s``, ``startup_s`` and
    ``out``. Service logs go to ``run_dir/logs`` (default: a temporary folder, removed).

    Raises :class:`EvalArgumentError` before starting anything when an argument is bad.
    """
    from axpo_rollout.services import local_services

    plan = _Plan(tuple(families), split, questions, n, tuple(ks), temperature)
    plan.check(spec)
    model_dir = _check_model(Path(model_dir))
    spec = spec.model_copy(update={"model": str(model_dir.resolve())})
    with tempfile.TemporaryDirectory(prefix="axpo-eval-") as tmp:
        folder = Path(run_dir) if run_dir is not None else Path(tmp)
        with local_services(spec, model_dir, folder) as services:
            summary = _with_backend(services.backend, spec, spec.model, plan, out_path, on_question)
            summary["startup_s"] = round(services.startup_s, 1)
    return summary
