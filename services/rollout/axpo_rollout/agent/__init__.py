"""The agent loop, token-in/token-out, and the group sampler (GRPO, plus AXPO's resampling).

No gRPC here: the loop talks to a :class:`Backend` (``axpo_rollout.clients`` implements it
over gRPC; tests may give any object with these methods).

One concept per module, each building on the ones before it:

- ``cancel``: :class:`CancelToken` and :class:`Cancelled` (stopping a speculative branch).
- ``backend``: :class:`Backend`, the loop's port to the services, and
  :class:`PromptTooLongError`.
- ``vocab``: :class:`Vocab`, the checkpoint's tokenizer and the ids of the tags the loop
  looks for.
- ``state``: :class:`RolloutState` (a rollout under construction), :class:`Timings`, and
  the finished trajectory made from a state.
- ``rollout``: one rollout, turn by turn (prompt, sampled turns, tool calls, segments, the
  deliberate differences from the chat template), and scoring.
- ``resampling``: AXPO's resampling of a group, sequential or speculative
  (:class:`SpeculationCounters`).
- ``loop``: :class:`AgentLoop`, one question's group: first turns, continuations, scores and
  (AXPO) resamples.
"""

from axpo_rollout.agent.backend import Backend, PromptTooLongError
from axpo_rollout.agent.cancel import Cancelled, CancelToken
from axpo_rollout.agent.loop import AgentLoop
from axpo_rollout.agent.resampling import SpeculationCounters
from axpo_rollout.agent.state import RolloutState, Timings
from axpo_rollout.agent.vocab import Vocab

__all__ = [
    "AgentLoop",
    "Backend",
    "CancelToken",
    "Cancelled",
    "PromptTooLongError",
    "RolloutState",
    "SpeculationCounters",
    "Timings",
    "Vocab",
]
