"""The loop's port to the services: :class:`Backend` (``axpo_rollout.clients`` implements it
over gRPC; tests may give any object with these methods)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from axpo.contracts.domain import (
    Image,
    Reward,
    RewardWeights,
    Sample,
    SamplingParams,
    ScoreItem,
    ToolCall,
    ToolResult,
)
from axpo_rollout.agent.cancel import CancelToken


class Backend(Protocol):
    """What the loop needs from the services. ``cancel``: when given and cancelled while the
    call is in flight, the call stops early and raises :class:`Cancelled`."""

    def generate(
        self,
        prompt: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]: ...

    def resume(
        self,
        prompt: Sequence[int],
        prefix: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]: ...

    def call_tool(
        self, call: ToolCall, images: Sequence[Image], timeout_s: float
    ) -> ToolResult: ...

    def score(self, items: Sequence[ScoreItem], weights: RewardWeights) -> list[Reward]: ...


class PromptTooLongError(ValueError):
    """The inference service refused a prompt as longer than its context: the rollout ends
    truncated (raised by a Backend)."""
