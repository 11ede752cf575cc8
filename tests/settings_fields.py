"""Which settings class a service reads, and whether an ``AXPO_*`` variable is one of its
fields: shared by the tests that tie the Dockerfiles, compose.yaml and the Helm chart to the
code (a typo in any of them must fail a test, not a container at start-up)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_settings import BaseSettings

from axpo.settings.api import ApiSettings
from axpo.settings.inference import InferenceSettings
from axpo.settings.learner import LearnerSettings
from axpo.settings.rollout import RolloutSettings
from axpo.settings.tools import ToolsSettings
from axpo.settings.verifier import VerifierSettings

SETTINGS: dict[str, type[BaseSettings]] = {
    "api": ApiSettings,
    "verifier": VerifierSettings,
    "tools": ToolsSettings,
    "inference": InferenceSettings,
    "learner": LearnerSettings,
    "rollout": RolloutSettings,
}
"""``axpo serve <service>`` -> the settings class it reads."""


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model an annotation holds (``X`` or ``X | None``); None for a value."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def field_path_error(cls: type[BaseModel], path: list[str]) -> str | None:
    """Why ``path`` (``["rpc", "host"]``) is not a field path of ``cls``; None when it is."""
    model: type[BaseModel] | None = cls
    for i, part in enumerate(path):
        if model is None:
            return f"{'.'.join(path[:i])} is not a settings model (no field {part!r})"
        if part not in model.model_fields:
            return f"{model.__name__} has no field {part!r}"
        model = _nested_model(model.model_fields[part].annotation)
    return None


def env_error(cls: type[BaseSettings], name: str) -> str | None:
    """Why the variable ``name`` (``AXPO_LEARNER_QUEUE__REDIS_URL``) is not a field of
    ``cls`` (its prefix, then ``__`` between nested fields); None when it is."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    if not name.upper().startswith(prefix.upper()):
        return f"{name}: not under {cls.__name__}'s prefix {prefix}"
    delimiter = str(cls.model_config.get("env_nested_delimiter"))
    problem = field_path_error(cls, name[len(prefix) :].lower().split(delimiter))
    return None if problem is None else f"{name}: {problem}"


def validator_missing(what: str) -> None:
    """Skip a test whose validator is not installed here; under CI (``CI`` set, as
    ``.ci/run`` is run) fail instead: ``scripts/setup.sh`` installs every validator, so a
    missing one there is a broken setup, not a reason to skip."""
    import os

    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{what} (setup.sh should have installed it)")
    pytest.skip(what)
