"""A deployment's learner: which settings a job may change, and which model it may ask for
(``axpo_learner.jobs``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from axpo.settings.job import JobSpec
from axpo.settings.learner import LearnerSettings
from axpo_learner.jobs import (
    DEPLOYMENT_FIELDS,
    JobRefused,
    check_model,
    job_settings,
    queue_backlog,
)


def _deployment(tmp_path: Path) -> LearnerSettings:
    return LearnerSettings(
        model=str(tmp_path / "model"),
        model_name="Org/Model-2B",
        job_store=True,
        jobs_dir=str(tmp_path / "jobs"),
        lr=1e-6,
        publish_dir="/shared/publish",
        max_policy_lag=2,
    )


def _spec(tmp_path: Path, **learner: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "job",
            "model": str(tmp_path / "model"),
            "steps": 7,
            "questions_per_step": 3,
            "seed": 11,
            "run": {"learner": learner},
        }
    )


def test_a_job_sets_its_training_knobs_and_the_deployment_keeps_its_own(tmp_path):
    settings = _deployment(tmp_path)
    spec = _spec(tmp_path, lr=3e-5, kl_coef=0.01, publish_dir="/elsewhere", max_policy_lag=9)
    job_dir = tmp_path / "jobs" / "job-1"
    merged, ignored = job_settings(settings, spec, "job-1", job_dir)
    assert (merged.lr, merged.kl_coef) == (3e-5, 0.01)
    assert (merged.seed, merged.max_steps, merged.questions_per_step) == (11, 7, 3)
    assert merged.job_id == "job-1"
    assert not merged.job_store
    assert merged.checkpoint_dir == str(job_dir / "checkpoints")
    assert merged.export_dir == str(job_dir / "final-model")
    assert merged.metrics_path == str(job_dir / "metrics.jsonl")
    assert merged.publish_dir == "/shared/publish"
    assert merged.max_policy_lag == 2
    assert ignored == ["max_policy_lag", "publish_dir"]
    assert {"model", "queue", "inference_targets", "jobs_dir"} <= DEPLOYMENT_FIELDS


def test_a_job_with_an_invalid_learner_field_is_refused_naming_it(tmp_path):
    spec = _spec(tmp_path)
    spec.run.learner["lr"] = -1.0  # past the spec's own validation, as a stored job could be
    with pytest.raises(JobRefused, match="lr"):
        job_settings(_deployment(tmp_path), spec, "job-1", tmp_path)


def test_a_job_must_ask_for_the_deployments_model(tmp_path):
    settings = _deployment(tmp_path)
    (tmp_path / "model").mkdir()
    check_model(settings, _spec(tmp_path))
    check_model(settings, _spec(tmp_path).model_copy(update={"model": "Org/Model-2B"}))
    other_path = str(tmp_path / "x" / ".." / "model")
    check_model(settings, _spec(tmp_path).model_copy(update={"model": other_path}))
    with pytest.raises(JobRefused, match=r"model 'Org/Other'.*serves"):
        check_model(settings, _spec(tmp_path).model_copy(update={"model": "Org/Other"}))


def test_the_backlog_holds_the_steps_between_checkpoints_plus_two(tmp_path):
    spec = _spec(tmp_path)
    assert queue_backlog(spec, LearnerSettings(checkpoint_every=2)) == 3 * (2 + 2)
    assert queue_backlog(spec, LearnerSettings(checkpoint_every=50)) == 3 * (7 + 2)
