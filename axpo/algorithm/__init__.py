"""The RL algorithm as pure functions: no I/O, no model, no service.

Plain Python for advantages, masks and AXPO's selection; torch tensors for the loss (torch is
imported lazily, so importing this package keeps the core light). The paper leaves several
definitions open; they are fixed in these modules' docstrings (docs/algorithm.md tells the
whole algorithm):

- :mod:`~axpo.algorithm.advantages`: group-normalized advantages, ``union``/``per_prefix``.
- :mod:`~axpo.algorithm.selection`: AXPO's condition, candidate prefixes, uncertainty, keep-rho.
- :mod:`~axpo.algorithm.loss`: the loss mask and the clipped policy loss with its aggregations.
- :mod:`~axpo.algorithm.diagnostics`: per-step statistics of the rollouts a step consumed.
- :mod:`~axpo.algorithm.pass_at_k`: the unbiased pass@k estimator of an evaluation.

The names below are the package's API; callers write ``from axpo import algorithm`` and
``algorithm.needs_resampling(...)``.
"""

from axpo.algorithm.advantages import (
    DEFAULT_STD_FLOOR,
    AdvantageSet,
    Grouping,
    advantage_sets,
    group_advantages,
    normalized_advantages,
    trajectory_rewards,
)
from axpo.algorithm.loss import (
    Aggregation,
    LossOutput,
    k3_kl,
    loss_denominator,
    loss_mask,
    mean_metrics,
    policy_loss,
)
from axpo.algorithm.pass_at_k import mean_pass_at_k, pass_at_k
from axpo.algorithm.selection import (
    Anchor,
    PrefixCandidate,
    Uncertainty,
    is_original,
    needs_resampling,
    prefix_candidates,
    resample_counts,
    select_prefixes,
    speculative_prefixes,
    uncertainty_score,
)

__all__ = [
    "DEFAULT_STD_FLOOR",
    "AdvantageSet",
    "Aggregation",
    "Anchor",
    "Grouping",
    "LossOutput",
    "PrefixCandidate",
    "Uncertainty",
    "advantage_sets",
    "group_advantages",
    "is_original",
    "k3_kl",
    "loss_denominator",
    "loss_mask",
    "mean_metrics",
    "mean_pass_at_k",
    "needs_resampling",
    "normalized_advantages",
    "pass_at_k",
    "policy_loss",
    "prefix_candidates",
    "resample_counts",
    "select_prefixes",
    "speculative_prefixes",
    "trajectory_rewards",
    "uncertainty_score",
]
