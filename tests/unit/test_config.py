"""Settings and job specs: documented fields, environment overrides, errors that name the field."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from axpo import settings
from axpo.contracts.domain import RewardWeights
from axpo.settings import job, verifier

REPO = Path(__file__).resolve().parents[2]


def _models(root: type[BaseModel]) -> set[type[BaseModel]]:
    found = {root}
    for field in root.model_fields.values():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found |= _models(ann)
    return found


def _settings_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"axpo.settings.{m.name}")
        for m in pkgutil.iter_modules(settings.__path__)
    ]


# Every pydantic model defined in any settings module (a new service's settings included).
ALL_MODELS = sorted(
    {
        obj
        for module in _settings_modules()
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == module.__name__
    },
    key=lambda m: m.__name__,
)


def test_each_service_has_its_settings_module():
    names = {m.__name__.rsplit(".", 1)[1] for m in _settings_modules()}
    assert {"base", "inference", "job", "learner", "queue", "rollout", "tools", "verifier"} <= names
    assert len(ALL_MODELS) >= 17, [m.__name__ for m in ALL_MODELS]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_every_field_is_documented(model):
    missing = [name for name, f in model.model_fields.items() if not f.description]
    assert not missing, f"{model.__name__} fields without a docstring: {missing}"


def test_environment_overrides_nested_fields(monkeypatch):
    monkeypatch.setenv("AXPO_VERIFIER_RPC__PORT", "6123")
    monkeypatch.setenv("AXPO_VERIFIER_DEFAULT_REL_TOL", "0.05")
    monkeypatch.setenv("AXPO_VERIFIER_REWARD_WEIGHTS__TOOL_BONUS", "0.5")
    s = verifier.VerifierSettings()
    assert s.rpc.port == 6123
    assert s.default_rel_tol == 0.05
    assert s.reward_weights == RewardWeights(accuracy=1.0, format=0.1, tool_bonus=0.5)


def test_bad_environment_value_names_the_field(monkeypatch):
    monkeypatch.setenv("AXPO_VERIFIER_MATH_WORKERS", "0")
    with pytest.raises(ValueError, match="math_workers"):
        verifier.VerifierSettings()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    if path.name.startswith("study-"):  # `axpo study` specs: every arm's job must be valid too
        from axpo.settings.study import load_study_spec

        study_spec = load_study_spec(path)
        assert study_spec.name
        assert study_spec.arms
        assert all(
            study_spec.arm_job(arm, seed=0, model="m", steps=None).eval is not None
            for arm in study_spec.arms
        )
    else:
        spec = job.load_job_spec(path)
        assert spec.name
    first_lines = path.read_text().splitlines()[:6]
    assert any("axpo " in line for line in first_lines), "config must open with its command"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("name: x\nmodel: m\nalgorithm: {rho: 1.5}\n", "algorithm.rho: Input should be less"),
        ("name: x\nmodel: m\nalgorithm: {name: ppo}\n", "algorithm.name: Input should be"),
        ("name: x\nmodel: m\nstepz: 3\n", "stepz: Extra inputs are not permitted"),
        ("model: m\n", "name: Field required"),
        ("name: 'bad name'\nmodel: m\n", "name: String should match pattern"),
        ("name: x\nmodel: m\nreward: {format: -1}\n", "reward.format: Input should be greater"),
        ("- a\n- b\n", "expected a mapping at the top level, got list"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
    ids=[
        "rho-range",
        "unknown-algorithm",
        "typo",
        "missing",
        "pattern",
        "negative",
        "list",
        "yaml",
    ],
)
def test_job_spec_errors_name_the_field(tmp_path, yaml_text, expected):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    with pytest.raises(job.JobSpecError) as err:
        job.load_job_spec(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(job.JobSpecError, match="cannot read"):
        job.load_job_spec(tmp_path / "nope.yaml")


def test_reward_spec_gives_weights():
    spec = job.RewardSpec(accuracy=1.0, format=0.0, tool_bonus=0.2)
    assert spec.weights() == RewardWeights(1.0, 0.0, 0.2)


def test_a_rollout_workers_consumer_name_is_its_hosts_unless_set(monkeypatch):
    import socket

    from axpo.settings.rollout import RolloutSettings

    monkeypatch.delenv("AXPO_ROLLOUT_CONSUMER", raising=False)
    assert RolloutSettings().consumer_name() == socket.gethostname()
    assert RolloutSettings(consumer="rollout-3").consumer_name() == "rollout-3"


def _only_env(monkeypatch, env: dict[str, str]) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("AXPO_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_a_nested_setting_given_in_part_keeps_the_rest_of_its_default(monkeypatch):
    from axpo.settings.inference import InferenceSettings
    from axpo.settings.rollout import RolloutSettings
    from axpo.settings.tools import ToolsSettings
    from axpo.settings.verifier import VerifierSettings

    # An image sets only the host: the service keeps its own port (not RpcServerSettings' 0).
    _only_env(monkeypatch, {"AXPO_VERIFIER_RPC__HOST": "0.0.0.0"})
    rpc = VerifierSettings().rpc
    assert (rpc.host, rpc.port) == ("0.0.0.0", 50053)
    _only_env(monkeypatch, {"AXPO_INFERENCE_RPC__HOST": "0.0.0.0"})
    rpc = InferenceSettings().rpc
    assert (rpc.host, rpc.port, rpc.max_workers) == ("0.0.0.0", 50051, 64)
    # compose sets only the target: generation keeps its 600 s deadline (not the class's 30).
    _only_env(monkeypatch, {"AXPO_ROLLOUT_INFERENCE__TARGET": "inference:50051"})
    target = RolloutSettings().inference
    assert (target.target, target.deadline_s) == ("inference:50051", 600.0)
    # Two levels down, and a partial mapping given in code.
    _only_env(monkeypatch, {"AXPO_TOOLS_PYTHON__ENABLED": "false"})
    assert ToolsSettings().python.enabled is False
    _only_env(monkeypatch, {})
    assert VerifierSettings(rpc={"host": "0.0.0.0"}).rpc.port == 50053  # type: ignore[arg-type]


def test_a_typo_in_a_nested_setting_is_still_an_error(monkeypatch):
    from pydantic import ValidationError

    from axpo.settings.verifier import VerifierSettings

    monkeypatch.setenv("AXPO_VERIFIER_RPC__HOSTNAME", "0.0.0.0")
    with pytest.raises(ValidationError, match="hostname"):
        VerifierSettings()
