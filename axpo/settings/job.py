"""The YAML job spec (``configs/*.yaml``): what to train, how to sample and score, and how
``axpo run`` lays out its local processes; :func:`load_job_spec` reads and validates one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from axpo.contracts.domain import RewardWeights
from axpo.settings.base import MODEL_CONFIG, format_validation_error
from axpo.settings.inference import InferenceSettings
from axpo.settings.learner import LearnerSettings
from axpo.settings.tools import ToolsSettings


class AlgorithmSpec(BaseModel):
    """GRPO or AXPO and their knobs (docs/algorithm.md, "Knobs")."""

    model_config = MODEL_CONFIG

    name: Literal["grpo", "axpo"] = "axpo"
    """``grpo``: plain group sampling; ``axpo``: plus tool-call resampling of all-wrong tool
    subgroups from frozen thinking prefixes."""
    group_size: Annotated[int, Field(ge=2, le=256)] = 8
    """Rollouts per question (G)."""
    tool_call_anchor: Literal["first", "any"] = "first"
    """Which tool call ends a candidate thinking prefix."""
    uncertainty: Literal["mean_entropy", "first_token_entropy", "neg_mean_logprob"] = "mean_entropy"
    """Uncertainty score of a candidate prefix, measured on the original tool-call tokens."""
    rho: Annotated[float, Field(gt=0, le=1)] = 0.25
    """Fraction of candidate prefixes kept (at least one)."""
    resamples_per_prefix: Annotated[int, Field(ge=1)] | None = None
    """K; unset means the budget K * kept = group_size / 2."""
    advantage_grouping: Literal["union", "per_prefix"] = "union"
    """Normalize advantages over the group plus resamples, or per shared prefix."""
    mask_frozen_prefix: bool = True
    """Exclude the frozen prefix of resampled rollouts from the loss."""
    speculative_resampling: bool = False
    """Start AXPO's resamples as soon as the first turns are sampled (they depend only on the
    frozen prefixes, known then), while the original rollouts still run, and keep them only
    if the condition holds once those are scored; cancel them as soon as a tool user is
    correct. Same samples, shorter group latency, some discarded work: worth it when the
    engine has spare batch capacity and answers after a tool call are long; on the 2-core CPU
    bench it saved nothing (README). Applies with ``tool_call_anchor: first``; false:
    resample after scoring, in sequence."""


class RewardSpec(BaseModel):
    """Reward composition for the job."""

    model_config = MODEL_CONFIG

    accuracy: Annotated[float, Field(ge=0)] = 1.0
    """Weight of correctness (0 or 1)."""
    format: Annotated[float, Field(ge=0)] = 0.1
    """Weight of the format score (well-formed think/answer/tool-call structure)."""
    tool_bonus: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the bonus for a correct answer reached with at least one tool call."""

    def weights(self) -> RewardWeights:
        return RewardWeights(accuracy=self.accuracy, format=self.format, tool_bonus=self.tool_bonus)


DEFAULT_SYSTEM_PROMPT = (
    "You are a careful visual assistant. Think inside <think></think>, call a tool when the "
    "image is too small to read, and give the final answer as <answer>X</answer>."
)


FamilyName = Literal["colour_cell", "arith", "town_facts", "zoom_digits"]


class TaskSpec(BaseModel):
    """The questions a job trains on (``axpo.study.tasks``: procedurally generated, seeded)."""

    model_config = MODEL_CONFIG

    family: FamilyName | list[FamilyName] = "zoom_digits"
    """Task family, or a list of families that take turns. ``colour_cell``: the colour of a
    grid cell, seen only by zooming in; ``arith``: a product computed with ``python``;
    ``town_facts``: a year looked up with ``search``; ``zoom_digits``: a small boxed number
    among distractors (which choice is it?)."""
    split: Literal["train", "heldout"] = "train"
    """Which seeds: ``train`` (0 .. 999,999) or ``heldout`` (from 1,000,000); the families keep
    the two splits' content apart."""
    count: Annotated[int, Field(ge=1)] = 256
    """Questions per family (seeds ``seed .. seed+count-1`` of the split), cycled in order."""
    seed: int = 0
    """First task seed within the split."""
    image_size: Annotated[int, Field(ge=64, le=4096)] = 256
    """Side of the square question image in pixels (a multiple of 32 avoids resizing;
    ``colour_cell`` needs a multiple of 128)."""

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        names = self.family_names()
        if not names:
            raise ValueError("family: give at least one family")
        if len(set(names)) != len(names):
            raise ValueError(f"family: {names} names a family twice")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.split == "train" and self.seed + self.count > 1_000_000:
            raise ValueError("seed + count must stay below 1,000,000 (the held-out seeds)")
        if "colour_cell" in names and self.image_size % 128:
            raise ValueError(
                f"colour_cell needs image_size a multiple of 128, got {self.image_size}"
            )
        return self

    def family_names(self) -> list[str]:
        return [self.family] if isinstance(self.family, str) else list(self.family)


class RolloutSpec(BaseModel):
    """How one rollout is sampled: the agent loop's limits and the sampling parameters."""

    model_config = MODEL_CONFIG

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System text before the tool schemas."""
    tools: list[str] = ["image_zoom_in_tool"]
    """Names of the tools offered to the model (the tool server's names); empty: no tools."""
    max_turns: Annotated[int, Field(ge=1)] = 4
    """Assistant turns per rollout (each tool call ends a turn)."""
    max_new_tokens: Annotated[int, Field(ge=1)] = 512
    """Tokens one assistant turn may generate."""
    max_total_tokens: Annotated[int, Field(ge=16)] = 4096
    """Whole-trajectory budget (prompt, turns, tool responses); a rollout reaching it is
    truncated and scored as it stands."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature. With ``top_p`` and ``top_k`` it is the one source of truth for the
    policy ratio: the engine reports the processing it applied, every group carries it, and
    the learner computes its logprobs the same way (``axpo_learner.logprobs``). Qwen's
    recommendation for Thinking models: 0.6 (with top-p 0.95, top-k 20)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling; 1 turns it off. The learner applies it too."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Top-k sampling; 0 turns it off. The learner applies it too."""
    tool_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Deadline of one tool call."""
    inflight_questions: Annotated[int, Field(ge=1)] = 4
    """Questions one rollout worker samples at once (their generations batch in vLLM). A group
    waiting only on its AXPO resamples gives its place to the next question (see
    ``resampling_questions``)."""
    resampling_questions: Annotated[int, Field(ge=0)] | None = None
    """Groups that may wait on their AXPO resamples on top of ``inflight_questions`` (their
    resumes batch with the new questions' generations, so resampling does not stall the
    worker). Unset: as many as ``inflight_questions``; 0: a group keeps its place until done."""

    def resampling_slots(self) -> int:
        return (
            self.inflight_questions
            if self.resampling_questions is None
            else self.resampling_questions
        )


class DemosSpec(BaseModel):
    """The SFT demonstrations (``axpo demos``): train-split questions solved with and without
    tools."""

    model_config = MODEL_CONFIG

    per_family: Annotated[int, Field(ge=1)] = 400
    """Demonstrations per family."""
    tool_rate: Annotated[float, Field(ge=0, le=1)] = 0.7
    """Share of demonstrations that call the tool; the rest answer directly with a guess."""
    seed: int = 0
    """Which train seeds and which demonstrations use the tool."""


class SftSpec(BaseModel):
    """``axpo sft`` on the demonstrations."""

    model_config = MODEL_CONFIG

    steps: Annotated[int, Field(ge=1)] = 300
    """Optimizer steps."""
    batch_size: Annotated[int, Field(ge=1)] = 16
    """Demonstrations per step."""
    lr: Annotated[float, Field(gt=0)] = 2e-3
    """Peak learning rate (warmup, then cosine decay)."""
    seed: int = 0
    """Seed of the data order."""
    train_vision: bool = True
    """Train the vision tower too (the tiny model's is random: it must learn to see)."""


class RestartSpec(BaseModel):
    """How ``axpo run`` restarts a rollout worker, the tool server or the verifier that exits
    while the run needs it (like compose's ``restart: always`` with a limit): after
    ``backoff_s``, doubled at each further restart of the same process up to
    ``max_backoff_s``; one exit more than ``max`` fails the run with that process's exit code
    and log tail. The inference service and the learner are never restarted (see
    :mod:`axpo.local.launcher`)."""

    model_config = MODEL_CONFIG

    max: Annotated[int, Field(ge=0)] = 3
    """Restarts allowed per process over the whole run; 0: the first exit fails the run."""
    backoff_s: Annotated[float, Field(ge=0)] = 1.0
    """Wait before a process's first restart, in seconds."""
    max_backoff_s: Annotated[float, Field(ge=0)] = 30.0
    """Longest wait before a restart, in seconds (the doubling stops there)."""
    reset_after_s: Annotated[float, Field(gt=0)] | None = None
    """A process that ran this long since its last start has its count (and backoff) start
    again from 0 when it exits: the budget then limits a crash loop, not a long life (a
    standing deployment: ``axpo deploy`` uses 600 s). Unset: the budget covers the whole run."""

    @model_validator(mode="after")
    def _check(self) -> RestartSpec:
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) must be at least backoff_s "
                f"({self.backoff_s})"
            )
        return self

    def delay_s(self, restart: int) -> float:
        """The wait before the ``restart``-th restart (1-based) of one process.

        >>> [RestartSpec(backoff_s=1, max_backoff_s=5).delay_s(n) for n in (1, 2, 3, 4)]
        [1.0, 2.0, 4.0, 5.0]
        """
        if restart < 1:
            raise ValueError(f"restart numbers start at 1, got {restart}")
        # min() before the power would overflow for a process restarted thousands of times.
        return float(min(self.backoff_s * 2 ** min(restart - 1, 62), self.max_backoff_s))


class RunSpec(BaseModel):
    """``axpo run``: the local processes and their settings (environment-style overrides)."""

    model_config = MODEL_CONFIG

    rollout_workers: Annotated[int, Field(ge=1)] = 1
    """Rollout worker processes."""
    inference: dict[str, Any] = {}
    """``InferenceSettings`` fields for the inference service (e.g. ``kv_cache_gib``)."""
    tools: dict[str, Any] = {}
    """``ToolsSettings`` fields for the tool server (e.g. ``zoom: {min_pixels: 4096}``)."""
    learner: dict[str, Any] = {}
    """``LearnerSettings`` fields for the learner (e.g. ``lr``, ``micro_batch_tokens``)."""
    startup_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    """How long the services may take to become healthy."""
    prepare_model: Literal["none", "tiny", "tiny-warm-start", "tiny-sft"] = "none"
    """When ``model`` is a directory that does not exist yet: ``tiny`` builds the tiny random
    checkpoint there (``axpo model tiny``), ``tiny-warm-start`` also gives it a short
    supervised warm start on the job's tasks (``axpo model warm-start``), ``tiny-sft`` builds
    it with ``tiny_max_pixels`` and runs the SFT stage on demonstrations of the job's families
    (``axpo demos`` with ``demos``, then ``axpo sft`` with ``sft``); ``none`` fails."""
    tiny_max_pixels: Annotated[int, Field(ge=1024, le=512 * 512)] = 512 * 512
    """The tiny model's image pixel budget (``prepare_model: tiny-sft``)."""
    demos: DemosSpec = DemosSpec()
    """SFT demonstrations (``prepare_model: tiny-sft``)."""
    sft: SftSpec = SftSpec()
    """The SFT stage (``prepare_model: tiny-sft``)."""
    warm_start_steps: Annotated[int, Field(ge=1)] = 200
    """Optimizer steps of the warm start (``prepare_model: tiny-warm-start``)."""
    max_prompt_backlog: Annotated[int, Field(ge=1)] | None = None
    """Questions queued ahead of the rollout workers; unset: two steps' worth."""
    restarts: RestartSpec = RestartSpec()
    """Restarting a rollout worker, the tool server or the verifier that exits mid-run."""

    @model_validator(mode="after")
    def _check_serviceservice_settings(self) -> RunSpec:
        # Fail at `axpo job check` time, naming the service, not minutes later in a subprocess.
        for name, cls in (
            ("inference", InferenceSettings),
            ("tools", ToolsSettings),
            ("learner", LearnerSettings),
        ):
            try:
                cls.model_validate(getattr(self, name))
            except ValidationError as exc:
                raise ValueError(f"run.{name}:\n{format_validation_error(exc)}") from None
        return self


class EvalSpec(BaseModel):
    """Held-out evaluation of the final policy (``axpo run``), through the same services:
    ``n`` samples per question, Pass@k and tool-use rates per family (``axpo eval``)."""

    model_config = MODEL_CONFIG

    family: FamilyName | list[FamilyName] | None = None
    """Families to evaluate; unset: the job's ``tasks.family``."""
    split: Literal["train", "heldout"] = "heldout"
    """Which seeds (``heldout``: questions the job never trains on)."""
    questions: Annotated[int, Field(ge=1)] = 16
    """Questions per family."""
    n: Annotated[int, Field(ge=1)] = 4
    """Samples per question."""
    k: list[Annotated[int, Field(ge=1)]] = [1, 4]
    """Pass@k for these k (each at most ``n``)."""
    temperature: Annotated[float, Field(gt=0)] | None = None
    """Sampling temperature; unset: the job's ``rollout.temperature``."""
    before: bool = False
    """Also evaluate the starting policy, before the first step (``eval-before.json``)."""
    every: Annotated[int, Field(ge=1)] | None = None
    """Also evaluate every this many steps while training runs (concurrently, on the policy
    the inference service holds then; ``evals/step-<N>.json``, a curve in the report); unset:
    only at the end."""
    every_questions: Annotated[int, Field(ge=1)] | None = None
    """Questions per family of each evaluation during training; unset: ``questions``."""

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if not self.k or max(self.k) > self.n:
            raise ValueError(f"k {self.k} must be non-empty with every k <= n ({self.n})")
        return self

    def cli_args(self, families: list[str], questions: int | None = None) -> list[str]:
        """The ``axpo eval`` arguments that ask for this evaluation of ``families`` (of
        ``questions`` per family instead of :attr:`questions` when given)."""
        args = ["--tasks", ",".join(families), "--split", self.split]
        args += ["--questions", str(questions or self.questions), "--n", str(self.n)]
        args += ["--k", ",".join(map(str, self.k)), "--json"]
        if self.temperature is not None:
            args += ["--temperature", str(self.temperature)]
        return args

    def family_names(self, tasks: TaskSpec) -> list[str]:
        if self.family is None:
            return tasks.family_names()
        return [self.family] if isinstance(self.family, str) else list(self.family)


class JobSpec(BaseModel):
    """A training job, as written in a YAML file under configs/."""

    model_config = MODEL_CONFIG

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    """Job name: letters, digits, ``.``, ``_``, ``-``."""
    model: Annotated[str, Field(min_length=1)]
    """Model checkpoint: a local directory or a hub name."""
    algorithm: AlgorithmSpec = AlgorithmSpec()
    """Policy-optimization algorithm."""
    reward: RewardSpec = RewardSpec()
    """Reward composition."""
    steps: Annotated[int, Field(ge=1)] = 100
    """Optimizer steps to run."""
    questions_per_step: Annotated[int, Field(ge=1)] = 16
    """Questions (groups) per optimizer step."""
    seed: int = 0
    """Seed for task sampling, rollouts and the learner."""
    tasks: TaskSpec = TaskSpec()
    """Where the questions come from."""
    rollout: RolloutSpec = RolloutSpec()
    """The agent loop and its sampling."""
    run: RunSpec = RunSpec()
    """Local processes for ``axpo run``."""
    eval: EvalSpec | None = None
    """Evaluate the final policy after the last step (``axpo run`` writes ``eval.json`` and
    ``eval.jsonl`` in the run folder); unset: no evaluation."""


SpecT = TypeVar("SpecT", bound=BaseModel)


class JobSpecError(ValueError):
    """A job spec that cannot be used; the message names the file and every bad field."""


def load_spec(path: str | Path, cls: type[SpecT], what: str = "job spec") -> SpecT:
    """Read the YAML file ``path`` and validate it as ``cls``.

    Raises JobSpecError naming the file: unreadable, not YAML, not a mapping, or one line per
    invalid field with its dotted path.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise JobSpecError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise JobSpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise JobSpecError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise JobSpecError(f"{path}: invalid {what}:\n" + format_validation_error(exc)) from exc


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec.

    Raises JobSpecError with one line per problem, each naming the field's dotted path.
    """
    return load_spec(path, JobSpec)
