"""Settings of the reward verifier service (``axpo serve verifier``, ``AXPO_VERIFIER_*``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings

from axpo.contracts.domain import RewardWeights
from axpo.settings.base import LogSettings, RpcServerSettings, service_settings


class VerifierSettings(BaseSettings):
    """The reward verifier service (``axpo serve verifier``)."""

    model_config = service_settings("AXPO_VERIFIER_")

    rpc: RpcServerSettings = RpcServerSettings(port=50053)
    """Where the service listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    default_rel_tol: Annotated[float, Field(ge=0)] = 1e-2
    """Relative tolerance of the number checker when an item sets none."""
    default_abs_tol: Annotated[float, Field(ge=0)] = 0.0
    """Absolute tolerance of the number checker when an item sets none."""
    default_time_limit_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """Per-item time limit when an item sets none; a math check past it is killed."""
    math_workers: Annotated[int, Field(ge=1, le=64)] = 2
    """Worker processes for math checks (killable, so hostile LaTeX cannot hang the service)."""
    max_output_chars: Annotated[int, Field(ge=1)] = 2_000_000
    """Outputs longer than this are scored 0 without being read."""
    reward_weights: RewardWeights = RewardWeights()
    """Default reward composition (a request's weights override it field by field)."""
