"""Settings of the reward verifier service (``axpo serve verifier``, ``AXPO_VERIFIER_*``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from axpo.contracts.domain import RewardWeights
from axpo.settings.base import LogSettings, RpcServerSettings, ServiceSettings, service_settings


class VerifierSettings(ServiceSettings):
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
    math_float_rounding: Annotated[int, Field(ge=0, le=15)] = 6
    """Decimal places math-verify rounds numbers to before comparing them (``0.333333`` equals
    ``\\frac13`` at 6, ``0.3333`` does not)."""
    math_numeric_precision: Annotated[int, Field(ge=1, le=100)] = 15
    """Significant digits math-verify evaluates symbolic numbers with (``\\sqrt2``, ``\\pi``)."""
    math_set_relation: bool = True
    """Compare a relation with a set: ``-2 \\le x \\le 7`` equals ``x \\in [-2, 7]`` (an
    answer written as a chain of inequalities for an interval gold, and back)."""
    max_output_chars: Annotated[int, Field(ge=1)] = 2_000_000
    """Outputs longer than this are scored 0 without being read."""
    reward_weights: RewardWeights = RewardWeights()
    """Default reward composition (a request's weights override it field by field)."""
