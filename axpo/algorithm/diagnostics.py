"""Per-step diagnostics of the rollouts one optimizer step consumed (docs/algorithm.md,
"Diagnostics").

Pure functions on domain types: no I/O, no torch. :func:`step_diagnostics` turns the groups
of one optimizer step into a flat ``{key: float}`` record; :data:`DIAGNOSTIC_HELP` describes
every key in one line (the Prometheus HELP text, and the report's glossary).

Vocabulary:

- An *original* rollout has ``resampled_from == ""``; a *resample* names the original whose
  thinking prefix was frozen and resumed, and copies its first ``frozen_prefix_length`` tokens.
- A rollout *uses tools* when ``tool_calls`` is non-empty (a malformed call counts: the model
  tried to act).
- A rollout is *correct* when ``reward.correct``; a rollout without a reward is wrong and its
  reward total counts as 0.
- *Model-written tokens* of a rollout are its ``loss_mask`` tokens; those of a resample are
  the ones at or after ``frozen_prefix_length`` (the frozen ones were written, and are counted,
  in the original).
- *Turns* of a rollout are its assistant generation calls: the number of ``TOOL_RESPONSE``
  segments plus one, counted over its whole token sequence (a resample's frozen turns count).

Definitions of the keys (every value is a float; rates with an empty denominator are 0.0, and
the denominator is emitted alongside so a reader can tell "none" from "0%"):

- ``groups``: number of groups. ``rollouts``: original rollouts. ``resampled_rollouts``:
  resamples.
- ``reward_mean``: mean ``reward.total`` over originals.
- ``accuracy``: share of originals that are correct. ``accuracy_with_tools`` /
  ``accuracy_without_tools``: the same among originals that use / do not use tools, whose
  counts are ``rollouts_with_tools`` / ``rollouts_without_tools``.
- ``tool_call_rate``: ``rollouts_with_tools / rollouts``.
- ``all_wrong_tool_rate``: share of all groups whose tool-using originals are non-empty and all
  wrong (the trigger of AXPO's resampling).
- ``resampled_groups``: groups with at least one resample. ``resampled_subgroups``: distinct
  ``(group, resampled_from)`` pairs. ``recovery_rate``: share of those subgroups holding at
  least one correct resample.
- ``resample_token_share``: model-written tokens of resamples (after their frozen prefix)
  divided by model-written tokens of originals plus that numerator — the extra generation
  AXPO costs.
- ``tool_calls``: tool calls made, over originals and resamples; a resample's calls that lie
  inside its frozen prefix (their segment starts before ``frozen_prefix_length``) belong to the
  original and are not counted again. ``tool_error_rate``: calls whose result carries an error
  divided by ``tool_calls``; ``tool_error_rate.<kind>``: the same for each
  :class:`~axpo.contracts.domain.ToolErrorKind` (they sum to ``tool_error_rate``);
  ``malformed_call_rate``: equals ``tool_error_rate.malformed_call`` (the model wrote a call
  that does not parse).
- ``turns_mean`` / ``turns_max``: over all rollouts, originals and resamples.
- ``policy_lag_mean`` / ``policy_lag_max``: ``learner_version - group.policy_version`` over
  groups (``group.policy_version`` is the oldest policy that wrote any of its tokens).
- ``time.generate_s``, ``time.tools_s``, ``time.verify_s``, ``time.rollout_s``: mean over
  groups of the rollout worker's seconds in phase ``generate``, ``tools``, ``verify`` and
  ``total`` (:meth:`~axpo.contracts.domain.Group.timing`; an unrecorded phase counts as 0).
- ``response_tokens_mean``: mean model-written tokens per original rollout.
- ``generated_tokens``: tokens the model sampled this step, originals and resamples (a
  resample's frozen prefix not counted): the compute a study compares arms on.
"""

from __future__ import annotations

from collections.abc import Sequence

from axpo.algorithm import needs_resampling
from axpo.contracts.domain import Group, SegmentKind, ToolErrorKind, ToolInvocation, Trajectory

TIME_PHASES: tuple[tuple[str, str], ...] = (
    ("time.generate_s", "generate"),
    ("time.tools_s", "tools"),
    ("time.verify_s", "verify"),
    ("time.rollout_s", "total"),
)
"""``(diagnostic key, Group.timings name)`` pairs."""

DIAGNOSTIC_HELP: dict[str, str] = {
    "groups": "Groups (questions) consumed by the optimizer step.",
    "rollouts": "Original rollouts (not resampled) in the step.",
    "resampled_rollouts": "AXPO resampled rollouts in the step.",
    "reward_mean": "Mean reward total over original rollouts.",
    "accuracy": "Share of original rollouts that are correct.",
    "accuracy_with_tools": "Share correct among original rollouts with >= 1 tool call.",
    "accuracy_without_tools": "Share correct among original rollouts without tool calls.",
    "rollouts_with_tools": "Original rollouts with >= 1 tool call.",
    "rollouts_without_tools": "Original rollouts without tool calls.",
    "tool_call_rate": "Share of original rollouts with >= 1 tool call.",
    "all_wrong_tool_rate": (
        "Share of groups whose tool-using original rollouts exist and are all wrong."
    ),
    "resampled_groups": "Groups with >= 1 resampled rollout.",
    "resampled_subgroups": "Resampled subgroups: distinct (group, original) pairs with resamples.",
    "recovery_rate": "Share of resampled subgroups with >= 1 correct resampled rollout.",
    "resample_token_share": (
        "Model-written tokens of resamples after their frozen prefix / all model-written tokens."
    ),
    "tool_calls": "Tool calls made (calls inside a resample's frozen prefix not counted again).",
    "tool_error_rate": "Share of tool calls whose result is an error.",
    **{
        f"tool_error_rate.{kind.value}": f"Share of tool calls that failed with {kind.value}."
        for kind in ToolErrorKind
    },
    "malformed_call_rate": "Share of tool calls the model wrote malformed (unparsable).",
    "turns_mean": "Mean assistant turns (generation calls) per rollout, all rollouts.",
    "turns_max": "Most assistant turns (generation calls) of any rollout.",
    "policy_lag_mean": "Mean of learner version minus the group's oldest policy version.",
    "policy_lag_max": "Max of learner version minus the group's oldest policy version.",
    "time.generate_s": "Mean seconds per group the rollout worker spent generating.",
    "time.tools_s": "Mean seconds per group the rollout worker spent in tool calls.",
    "time.verify_s": "Mean seconds per group the rollout worker spent verifying.",
    "time.rollout_s": "Mean seconds per group of the whole rollout (worker total).",
    "response_tokens_mean": "Mean model-written tokens per original rollout.",
    "generated_tokens": "Tokens sampled this step, originals and resamples (frozen prefixes not "
    "counted).",
}

DIAGNOSTIC_KEYS: tuple[str, ...] = tuple(DIAGNOSTIC_HELP)
"""Every key :func:`step_diagnostics` returns, in its order."""


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _correct(traj: Trajectory) -> bool:
    return traj.reward is not None and traj.reward.correct


def model_tokens(traj: Trajectory) -> int:
    """Model-written tokens ``traj`` adds: its loss-mask tokens, after the frozen prefix for a
    resample."""
    start = traj.frozen_prefix_length if traj.resampled_from else 0
    return sum(traj.loss_mask[start:])


def turns(traj: Trajectory) -> int:
    """Assistant generation calls of ``traj``: ``TOOL_RESPONSE`` segments + 1."""
    return 1 + sum(seg.kind is SegmentKind.TOOL_RESPONSE for seg in traj.segments)


def new_tool_calls(traj: Trajectory) -> tuple[ToolInvocation, ...]:
    """The tool calls ``traj`` itself made: all of an original's; a resample's minus those whose
    segment starts inside its frozen prefix (they are the original's, copied). A call whose
    ``segment_index`` names no segment is kept."""
    if not traj.resampled_from or traj.frozen_prefix_length <= 0:
        return traj.tool_calls
    segs, frozen = traj.segments, traj.frozen_prefix_length
    return tuple(
        inv
        for inv in traj.tool_calls
        if not (0 <= inv.segment_index < len(segs) and segs[inv.segment_index].start < frozen)
    )


def step_diagnostics(groups: Sequence[Group], *, learner_version: int) -> dict[str, float]:
    """The diagnostics of one optimizer step's ``groups`` (definitions: module docstring).

    Raises ValueError when ``groups`` is empty.
    """
    if not groups:
        raise ValueError("step_diagnostics needs at least one group")
    originals = [t for g in groups for t in g.trajectories if not t.resampled_from]
    resamples = [t for g in groups for t in g.trajectories if t.resampled_from]
    with_tools = [t for t in originals if t.uses_tools]
    without_tools = [t for t in originals if not t.uses_tools]

    all_wrong = 0
    resampled_groups = 0
    subgroups: dict[tuple[int, str], bool] = {}
    for gi, g in enumerate(groups):
        if needs_resampling(g.trajectories):  # AXPO's own condition: one definition
            all_wrong += 1
        group_resamples = [t for t in g.trajectories if t.resampled_from]
        if group_resamples:
            resampled_groups += 1
        for t in group_resamples:
            key = (gi, t.resampled_from)
            subgroups[key] = subgroups.get(key, False) or _correct(t)

    original_tokens = sum(model_tokens(t) for t in originals)
    resample_tokens = sum(model_tokens(t) for t in resamples)

    calls = [inv for t in (*originals, *resamples) for inv in new_tool_calls(t)]
    errors_by_kind = dict.fromkeys(ToolErrorKind, 0)
    for inv in calls:
        if inv.result.error is not None:
            errors_by_kind[inv.result.error.kind] += 1
    n_calls = len(calls)

    all_turns = [turns(t) for t in (*originals, *resamples)]
    lags = [learner_version - g.policy_version for g in groups]
    n_groups = len(groups)

    out: dict[str, float] = {
        "groups": float(n_groups),
        "rollouts": float(len(originals)),
        "resampled_rollouts": float(len(resamples)),
        "reward_mean": _ratio(
            sum(t.reward.total for t in originals if t.reward is not None), len(originals)
        ),
        "accuracy": _ratio(sum(map(_correct, originals)), len(originals)),
        "accuracy_with_tools": _ratio(sum(map(_correct, with_tools)), len(with_tools)),
        "accuracy_without_tools": _ratio(sum(map(_correct, without_tools)), len(without_tools)),
        "rollouts_with_tools": float(len(with_tools)),
        "rollouts_without_tools": float(len(without_tools)),
        "tool_call_rate": _ratio(len(with_tools), len(originals)),
        "all_wrong_tool_rate": _ratio(all_wrong, n_groups),
        "resampled_groups": float(resampled_groups),
        "resampled_subgroups": float(len(subgroups)),
        "recovery_rate": _ratio(sum(subgroups.values()), len(subgroups)),
        "resample_token_share": _ratio(resample_tokens, original_tokens + resample_tokens),
        "tool_calls": float(n_calls),
        "tool_error_rate": _ratio(sum(errors_by_kind.values()), n_calls),
        **{
            f"tool_error_rate.{kind.value}": _ratio(count, n_calls)
            for kind, count in errors_by_kind.items()
        },
        "malformed_call_rate": _ratio(errors_by_kind[ToolErrorKind.MALFORMED_CALL], n_calls),
        "turns_mean": _ratio(sum(all_turns), len(all_turns)),
        "turns_max": float(max(all_turns, default=0)),
        "policy_lag_mean": _ratio(sum(lags), n_groups),
        "policy_lag_max": float(max(lags)),
        **{
            key: _ratio(sum(g.timing(phase) for g in groups), n_groups)
            for key, phase in TIME_PHASES
        },
        "response_tokens_mean": _ratio(original_tokens, len(originals)),
        "generated_tokens": float(original_tokens + resample_tokens),
    }
    assert tuple(out) == DIAGNOSTIC_KEYS, "DIAGNOSTIC_HELP and step_diagnostics disagree"
    return out
