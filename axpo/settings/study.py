"""The study spec (``axpo study CONFIG``): SFT once, then GRPO and AXPO arms from the same
checkpoint over several seeds, each evaluated on held-out questions; :func:`load_study_spec`
reads and validates one (``configs/study-tiny.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from axpo.settings.base import MODEL_CONFIG, format_validation_error
from axpo.settings.job import DemosSpec, EvalSpec, FamilyName, JobSpec, SftSpec, load_spec


class BaseModelSpec(BaseModel):
    """Where the study's starting checkpoint comes from."""

    model_config = MODEL_CONFIG

    path: str = ""
    """A checkpoint directory; empty: the study folder's ``base-model``."""
    build_tiny: bool = True
    """Build the tiny random-init Qwen3-VL there when the directory does not exist."""
    max_pixels: Annotated[int, Field(ge=1024)] = 64 * 64
    """The tiny model's image pixel budget (larger images are downscaled before the model sees
    them; ``colour_cell`` hides its colours at 64x64 and reveals them in a zoomed crop)."""
    seed: int = 0
    """Seed of the tiny model's random init."""


class ArmSpec(BaseModel):
    """One arm: an algorithm from the SFT checkpoint."""

    model_config = MODEL_CONFIG

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    """Arm name (folder and table row)."""
    algorithm: dict[str, Any] = {}
    """``AlgorithmSpec`` fields over the job's (e.g. ``{name: grpo}``)."""
    match_tokens_of: str | None = None
    """Equal-compute control: run as many steps as make this arm's generated tokens match the
    named arm's on the same seed (``steps x tokens(named) / tokens(this arm's first run)``,
    with the first run's per-step tokens measured by running the job's ``steps`` first)."""


class StudySpec(BaseModel):
    """A study: what ``axpo study`` runs (module docstring)."""

    model_config = MODEL_CONFIG

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    """Study name (the default output folder is ``runs/study-<name>``)."""
    families: list[FamilyName] = ["colour_cell", "arith", "town_facts"]
    """Task families: demonstrations, training and evaluation all use these."""
    base_model: BaseModelSpec = BaseModelSpec()
    """The starting checkpoint."""
    demos: DemosSpec = DemosSpec()
    """SFT demonstrations."""
    sft: SftSpec = SftSpec()
    """The SFT stage."""
    job: dict[str, Any] = {}
    """``JobSpec`` fields shared by every arm (``name``, ``model``, ``seed``, ``tasks.family``
    and ``eval`` are set by the study)."""
    arms: list[ArmSpec] = [
        ArmSpec(name="grpo", algorithm={"name": "grpo"}),
        ArmSpec(name="axpo", algorithm={"name": "axpo"}),
        ArmSpec(name="grpo-matched", algorithm={"name": "grpo"}, match_tokens_of="axpo"),
    ]
    """The arms, run in this order for each seed."""
    seeds: list[int] = [0, 1, 2]
    """One run per arm and seed."""
    eval: EvalSpec = EvalSpec(questions=16, n=4, k=[1, 4])
    """Held-out evaluation of the SFT checkpoint and of every run's final policy."""
    eval_sft: Literal["heldout", "none"] = "heldout"
    """Evaluate the SFT checkpoint too (the arms' common starting point)."""

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: duplicate names in {names}")
        for arm in self.arms:
            if (
                arm.match_tokens_of is not None
                and arm.match_tokens_of not in names[: names.index(arm.name)]
            ):
                raise ValueError(
                    f"arm {arm.name}: match_tokens_of {arm.match_tokens_of!r} must name an "
                    "earlier arm"
                )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: give distinct seeds, got {self.seeds}")
        for arm in self.arms:  # every arm's job must be valid now, not an hour in
            self.arm_job(arm, seed=self.seeds[0], model="model", steps=None)
        return self

    def arm_job(self, arm: ArmSpec, *, seed: int, model: str, steps: int | None) -> JobSpec:
        """The job one run of ``arm`` executes."""
        job = dict(self.job)
        algorithm = {**job.get("algorithm", {}), **arm.algorithm}
        tasks = {**job.get("tasks", {}), "family": list(self.families), "split": "train"}
        values: dict[str, Any] = {
            **job,
            "name": f"{self.name}-{arm.name}-s{seed}",
            "model": model,
            "seed": seed,
            "algorithm": algorithm,
            "tasks": tasks,
            "eval": self.eval.model_dump(),
        }
        if steps is not None:
            values["steps"] = steps
        try:
            return JobSpec.model_validate(values)
        except ValidationError as exc:
            raise ValueError(f"arm {arm.name}: job:\n{format_validation_error(exc)}") from None


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and validate a YAML study spec. Raises JobSpecError naming the file and every bad
    field."""
    return load_spec(path, StudySpec, "study spec")
