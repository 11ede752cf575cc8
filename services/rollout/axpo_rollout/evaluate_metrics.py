"""What an evaluation measures: one question's samples (:class:`QuestionResult`, made from the
question and its sampled group by :func:`question_result`) and the summary over questions
(:func:`summarize`). Pure: domain types in, plain values out.

Definitions (a *rollout* is one sample of a question; an evaluation samples without AXPO
resampling, so every rollout is an original):

- ``pass_at_<k>``: the unbiased pass@k of each question (:func:`axpo.algorithm.pass_at_k`,
  ``n`` samples, ``c`` correct), averaged over questions.
- ``accuracy``: share of rollouts whose answer the verifier judged correct.
- ``tool_call_rate``: share of rollouts with at least one tool call, a malformed one included
  (the model tried to act; as :mod:`axpo.algorithm.diagnostics` counts).
- ``tool_call_valid_rate``: share of tool calls that were well formed, named an offered tool,
  passed its JSON Schema and ran without error: exactly the calls whose result carries no
  :class:`~axpo.contracts.domain.ToolError` (the loop records each of those failures as one:
  ``malformed_call``, ``unknown_tool``, ``bad_arguments``, or the tool's own error).
- ``accuracy_with_tools`` / ``accuracy_without_tools``: accuracy among rollouts with / without
  a tool call (``rollouts_with_tools`` / ``rollouts_without_tools`` of them).
- ``mean_generated_tokens``: tokens the model wrote per rollout (its loss-mask tokens: turns,
  not the prompt or tool responses).
- ``truncated_rate``: share of rollouts cut by a token or turn budget.
- ``chance``: mean over questions of the accuracy of a guess without the tool
  (:attr:`axpo.study.tasks.Task.chance`).

A rate whose denominator is zero (no tool calls, no rollout without tools) is ``None``, so
"none" is never read as "0 %"; the denominator is reported next to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axpo.algorithm import pass_at_k
from axpo.algorithm.diagnostics import model_tokens
from axpo.contracts.domain import Group, Trajectory
from axpo.study.tasks import Task

DIGITS = 6
"""Summary rates are rounded to this many decimals (the per-question file keeps counts)."""


ARGUMENTS_CHARS = 500
"""A call's arguments are kept up to this many characters (what the model asked for)."""


@dataclass(frozen=True)
class CallResult:
    """One tool call of a sample: the tool it named (``""`` when unreadable), whether it was
    valid, the :class:`~axpo.contracts.domain.ToolErrorKind` value if not, and its arguments
    as the model wrote them (JSON text, cut at :data:`ARGUMENTS_CHARS`)."""

    name: str
    valid: bool
    error: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class SampleResult:
    """One rollout: the answer the verifier extracted (None: none found), whether it was
    correct, its tool calls, tokens the model wrote, whether a budget cut it."""

    answer: str | None
    correct: bool
    tool_calls: tuple[CallResult, ...]
    tokens: int
    truncated: bool

    @property
    def uses_tools(self) -> bool:
        return bool(self.tool_calls)


@dataclass(frozen=True)
class QuestionResult:
    """A question and its ``n`` samples (one line of the per-question file)."""

    family: str
    seed: int
    task_id: str
    gold: str
    chance: float
    samples: tuple[SampleResult, ...]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.samples)

    def to_json(self, ks: Sequence[int] = ()) -> dict[str, Any]:
        """The JSON-able record; with ``ks``, this question's ``pass_at_<k>`` too."""
        return {
            "family": self.family,
            "seed": self.seed,
            "task_id": self.task_id,
            "gold": self.gold,
            "chance": self.chance,
            "n": self.n,
            "correct": self.correct,
            **{f"pass_at_{k}": pass_at_k(self.n, self.correct, k) for k in ks},
            "samples": [
                {
                    "answer": s.answer,
                    "correct": s.correct,
                    "tool_calls": [
                        {
                            "name": c.name,
                            "valid": c.valid,
                            "error": c.error,
                            "arguments": c.arguments,
                        }
                        for c in s.tool_calls
                    ],
                    "tokens": s.tokens,
                    "truncated": s.truncated,
                }
                for s in self.samples
            ],
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> QuestionResult:
        """Read back what :meth:`to_json` wrote (to summarize a saved file again)."""
        return cls(
            family=record["family"],
            seed=record["seed"],
            task_id=record["task_id"],
            gold=record["gold"],
            chance=record["chance"],
            samples=tuple(
                SampleResult(
                    answer=s["answer"],
                    correct=s["correct"],
                    tool_calls=tuple(CallResult(**c) for c in s["tool_calls"]),
                    tokens=s["tokens"],
                    truncated=s["truncated"],
                )
                for s in record["samples"]
            ),
        )


def sample_result(traj: Trajectory) -> SampleResult:
    """What an evaluation keeps of one rollout (no reward: wrong, no answer)."""
    reward = traj.reward
    return SampleResult(
        answer=reward.extracted if reward is not None else None,
        correct=reward is not None and reward.correct,
        tool_calls=tuple(
            CallResult(
                name=inv.call.name,
                valid=inv.result.error is None,
                error=None if inv.result.error is None else inv.result.error.kind.value,
                arguments=inv.call.arguments_json[:ARGUMENTS_CHARS],
            )
            for inv in traj.tool_calls
        ),
        tokens=model_tokens(traj),
        truncated=traj.truncated,
    )


def question_result(task: Task, group: Group) -> QuestionResult:
    """The result of ``task`` from its sampled ``group``. Raises ValueError when the group is
    not the task's, or holds resampled rollouts (an evaluation samples without AXPO)."""
    if group.question_id != task.task_id:
        raise ValueError(f"group {group.group_id} answers {group.question_id}, not {task.task_id}")
    resampled = [t.trajectory_id for t in group.trajectories if t.resampled_from]
    if resampled:
        raise ValueError(
            f"group {group.group_id} holds resampled rollouts {resampled}: evaluate with "
            "algorithm.name grpo (no resampling)"
        )
    if not group.trajectories:
        raise ValueError(f"group {group.group_id} has no rollouts")
    return QuestionResult(
        family=task.family,
        seed=task.seed,
        task_id=task.task_id,
        gold=task.gold,
        chance=task.chance,
        samples=tuple(sample_result(t) for t in group.trajectories),
    )


def _rate(num: float, den: float) -> float | None:
    return round(num / den, DIGITS) if den else None


def _summary(results: Sequence[QuestionResult], ks: Sequence[int]) -> dict[str, Any]:
    samples = [s for r in results for s in r.samples]
    with_tools = [s for s in samples if s.uses_tools]
    without_tools = [s for s in samples if not s.uses_tools]
    calls = [c for s in samples for c in s.tool_calls]
    ns = {r.n for r in results}
    return {
        "questions": len(results),
        "n": ns.pop() if len(ns) == 1 else sorted(ns),
        "rollouts": len(samples),
        **{
            f"pass_at_{k}": round(
                math.fsum(pass_at_k(r.n, r.correct, k) for r in results) / len(results), DIGITS
            )
            for k in ks
        },
        "accuracy": _rate(sum(s.correct for s in samples), len(samples)),
        "tool_call_rate": _rate(len(with_tools), len(samples)),
        "tool_calls": len(calls),
        "tool_call_valid_rate": _rate(sum(c.valid for c in calls), len(calls)),
        "rollouts_with_tools": len(with_tools),
        "accuracy_with_tools": _rate(sum(s.correct for s in with_tools), len(with_tools)),
        "rollouts_without_tools": len(without_tools),
        "accuracy_without_tools": _rate(sum(s.correct for s in without_tools), len(without_tools)),
        "mean_generated_tokens": _rate(sum(s.tokens for s in samples), len(samples)),
        "truncated_rate": _rate(sum(s.truncated for s in samples), len(samples)),
        "chance": round(math.fsum(r.chance for r in results) / len(results), DIGITS),
    }


def check_ks(ks: Iterable[int], n: int) -> tuple[int, ...]:
    """``ks`` sorted without repeats. Raises ValueError when there are none, or one is below
    1 or above ``n`` (pass@k needs k <= n samples)."""
    out = tuple(sorted(set(ks)))
    if not out:
        raise ValueError("give at least one k for pass@k")
    bad = [k for k in out if not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k needs 1 <= k <= n = {n} samples per question; got k = {bad}")
    return out


def summarize(results: Sequence[QuestionResult], ks: Sequence[int]) -> dict[str, Any]:
    """The metrics (module docstring) over all ``results``, and per family under
    ``"families"`` (in order of first appearance). Raises ValueError when there are no
    results, a question has no samples, or a k is out of range for a question's n."""
    if not results:
        raise ValueError("nothing to summarize: no questions")
    empty = [r.task_id for r in results if r.n == 0]
    if empty:
        raise ValueError(f"questions without samples: {empty}")
    ks = check_ks(ks, min(r.n for r in results))
    by_family: dict[str, list[QuestionResult]] = {}
    for r in results:
        by_family.setdefault(r.family, []).append(r)
    return {
        **_summary(results, ks),
        "families": {family: _summary(rs, ks) for family, rs in by_family.items()},
    }
