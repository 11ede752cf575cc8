"""What every ``axpo`` subcommand shares: exit codes, loading a service package by name (a
missing one is a clear error saying what to install), usage errors."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

    SettingsT = TypeVar("SettingsT", bound=BaseSettings)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Service name -> (module it lives in, the distribution that provides it).
SERVICES = {
    "api": ("axpo_api", "services/api"),
    "inference": ("axpo_inference", "services/inference"),
    "learner": ("axpo_learner", "services/learner"),
    "rollout": ("axpo_rollout", "services/rollout"),
    "tools": ("axpo_tools", "services/tools"),
    "verifier": ("axpo_verifier", "services/verifier"),
}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback, exit code 2."""


def load_service(name: str, submodule: str) -> ModuleType:
    package, folder = SERVICES[name]
    try:
        return importlib.import_module(f"{package}.{submodule}")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == package:
            raise UsageError(
                f"the {name} service is not installed: pip install -e {folder}"
            ) from exc
        raise


def settings_or_usage_error(cls: type[SettingsT]) -> SettingsT:
    from pydantic import ValidationError

    from axpo.settings.base import format_validation_error

    try:
        return cls()
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        raise UsageError(
            f"invalid settings (environment {prefix}*):\n{format_validation_error(exc)}"
        ) from exc
