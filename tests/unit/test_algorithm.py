"""axpo.algorithm: advantages, AXPO grouping, loss masks and the clipped policy loss, on
hand-built inputs with values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from axpo import algorithm as alg
from axpo.contracts.domain import Group, Reward, Trajectory


def traj(
    tid: str,
    reward: float | None,
    *,
    n: int = 6,
    prompt: int = 2,
    parent: str = "",
    frozen: int = 0,
) -> Trajectory:
    return Trajectory(
        trajectory_id=tid,
        token_ids=tuple(range(n)),
        loss_mask=(False,) * prompt + (True,) * (n - prompt),
        logprobs=(0.0,) * n,
        entropies=(0.0,) * n,
        segments=(),
        prompt_length=prompt,
        reward=None if reward is None else Reward(reward, reward > 0, reward, 0, 0, None, "", ""),
        resampled_from=parent,
        frozen_prefix_length=frozen,
    )


def group(*trajs: Trajectory) -> Group:
    return Group(group_id="g", question_id="q", trajectories=trajs)


# --------------------------------------------------------------------------- advantages


@pytest.mark.parametrize(
    ("rewards", "scale", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], True, [0.0, 0.0, 0.0, 0.0]),
        ([0.0, 0.0], False, [0.0, 0.0]),
        ([1.0, 0.0], True, [1.0, -1.0]),
        (
            [1.0, 0.0, 0.0, 0.0],
            True,
            [3 / math.sqrt(3), -1 / math.sqrt(3)] + [-1 / math.sqrt(3)] * 2,
        ),
        ([1.0, 0.0, 0.0, 0.0], False, [0.75, -0.25, -0.25, -0.25]),
        ([2.0], True, [0.0]),
        ([], True, []),
    ],
)
def test_normalized_advantages(rewards, scale, expected):
    got = alg.normalized_advantages(rewards, scale_by_std=scale)
    assert got == pytest.approx(expected)


def test_std_floor_bounds_tiny_spreads():
    got = alg.normalized_advantages([0.0, 1e-9], std_floor=1e-3)
    assert got == pytest.approx([-5e-7, 5e-7])


def test_missing_reward_is_an_error():
    with pytest.raises(ValueError, match="t1 has no reward"):
        alg.group_advantages(group(traj("t0", 1.0), traj("t1", None)))


# Group: 4 originals (o2 is an all-wrong tool rollout whose prefix was resampled) + 2 resamples
# of o2, one correct.
AXPO_GROUP = group(
    traj("o0", 1.0),
    traj("o1", 0.0),
    traj("o2", 0.0),
    traj("o3", 0.0),
    traj("r0", 1.0, parent="o2", frozen=4),
    traj("r1", 0.0, parent="o2", frozen=4),
)


@pytest.mark.parametrize(
    ("grouping", "expected"),
    [
        # union: rewards [1,0,0,0,1,0]: mean 1/3, std sqrt(2)/3.
        ("union", [a / (math.sqrt(2) / 3) for a in (2 / 3, -1 / 3, -1 / 3, -1 / 3, 2 / 3, -1 / 3)]),
        # per_prefix: originals [1,0,0,0] among themselves; resamples in {o2, r0, r1} = [0,1,0].
        (
            "per_prefix",
            [
                math.sqrt(3),
                *[-1 / math.sqrt(3)] * 3,
                (2 / 3) / (math.sqrt(2) / 3),
                (-1 / 3) / (math.sqrt(2) / 3),
            ],
        ),
    ],
)
def test_axpo_grouping(grouping, expected):
    assert alg.group_advantages(AXPO_GROUP, grouping=grouping) == pytest.approx(expected)


def test_union_resampled_rollouts_join_the_group():
    sets = alg.advantage_sets(AXPO_GROUP.trajectories, "union")
    assert sets == [alg.AdvantageSet((0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5))]


def test_per_prefix_sets_and_orphans():
    g = group(
        traj("o0", 1.0),
        traj("o1", 0.0),
        traj("r0", 1.0, parent="gone", frozen=3),
        traj("r1", 0.0, parent="gone", frozen=3),
    )
    sets = alg.advantage_sets(g.trajectories, "per_prefix")
    assert sets == [alg.AdvantageSet((0, 1), (0, 1)), alg.AdvantageSet((2, 3), (2, 3))]
    assert alg.group_advantages(g, grouping="per_prefix") == pytest.approx([1, -1, 1, -1])


def test_grpo_group_is_the_same_under_both_groupings():
    g = group(traj("a", 1.0), traj("b", 0.5), traj("c", 0.0))
    assert alg.group_advantages(g, grouping="union") == alg.group_advantages(
        g, grouping="per_prefix"
    )


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("t", "mask_frozen", "expected"),
    [
        (traj("o", 1.0), True, (False, False, True, True, True, True)),
        (traj("r", 1.0, parent="o", frozen=4), True, (False, False, False, False, True, True)),
        (traj("r", 1.0, parent="o", frozen=4), False, (False, False, True, True, True, True)),
        # frozen_prefix_length on an original rollout is ignored.
        (traj("o", 1.0, frozen=4), True, (False, False, True, True, True, True)),
    ],
)
def test_loss_mask(t, mask_frozen, expected):
    assert alg.loss_mask(t, mask_frozen_prefix=mask_frozen) == expected


# --------------------------------------------------------------------------- loss


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_clip_fraction_counts_active_clips():
    # ratios e^{0.5}=1.65 (A>0 -> clipped high), e^{-0.5}=0.61 (A<0 -> clipped low),
    # e^{0.5} with A<0 (not clipped), 1.0 (not clipped); the last token is masked out.
    logp = _t([[0.5, -0.5, 0.5, 0.0, 0.5]])
    old = torch.zeros_like(logp)
    adv = _t([[1.0, -1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    out = alg.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert out.metrics["clip_fraction"] == pytest.approx(0.5)
    assert out.metrics["clip_high_fraction"] == pytest.approx(0.25)
    assert out.metrics["clip_low_fraction"] == pytest.approx(0.25)
    expected = (-1.28 + 0.8 + math.exp(0.5) - 1.0) / 4
    assert out.loss.item() == pytest.approx(expected)


def test_gradient_is_zero_where_clipped():
    logp = _t([[0.5, 0.0]]).requires_grad_()
    out = alg.policy_loss(
        logp,
        torch.zeros(1, 2, dtype=torch.float64),
        _t([[1.0, 1.0]]),
        torch.ones(1, 2, dtype=torch.bool),
    )
    out.loss.backward()
    assert logp.grad is not None
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5])


def test_on_policy_loss_is_minus_mean_advantage():
    logp = _t([[-1.0, -2.0, -3.0]])
    out = alg.policy_loss(logp, logp.clone(), _t([[2.0, 2.0, -1.0]]), torch.ones(1, 3))
    assert out.loss.item() == pytest.approx(-1.0)
    assert out.metrics["clip_fraction"] == 0.0
    assert out.metrics["approx_kl"] == 0.0


# Two sequences: one with 1 loss token (advantage 1), one with 3 (advantage -1); padded length 4.
AGG_ADV = _t([[1.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
AGG_MASK = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("token", (-1 + 3) / 4),  # per-token mean: the long sequence dominates
        ("sequence", (-1 + 1) / 2),  # per-sequence means, then their mean
        ("dr_grpo", (-1 + 3) / (2 * 4)),  # sum over a constant budget (n_seq * L)
    ],
)
def test_aggregation_variants(aggregation, expected):
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    out = alg.policy_loss(zeros, zeros, AGG_ADV, AGG_MASK, aggregation=aggregation)
    assert out.loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
def test_step_denominator_makes_micro_batches_add_up(aggregation):
    logp = _t([[-0.3, -1.0, -2.0, 0.0], [-0.1, -0.2, -0.7, 0.0]])
    old = logp + 0.05
    whole = alg.policy_loss(logp, old, AGG_ADV, AGG_MASK, aggregation=aggregation, norm_length=4)
    denom = alg.loss_denominator(aggregation, AGG_MASK.tolist(), norm_length=4)
    parts = [
        alg.policy_loss(
            logp[i : i + 1],
            old[i : i + 1],
            AGG_ADV[i : i + 1],
            AGG_MASK[i : i + 1],
            aggregation=aggregation,
            denominator=denom,
        ).loss.item()
        for i in range(2)
    ]
    assert sum(parts) == pytest.approx(whole.loss.item())


@pytest.mark.parametrize(
    ("logp", "ref"),
    [([-1.0, -2.0], [-1.0, -2.0]), ([-1.0, -2.0], [-3.0, -0.1]), ([-0.5], [-0.4])],
)
def test_k3_kl_nonnegative_and_zero_when_equal(logp, ref):
    kl = alg.k3_kl(_t(logp), _t(ref))
    assert (kl >= 0).all()
    if logp == ref:
        assert kl.tolist() == [0.0] * len(logp)
    else:
        assert (kl > 0).all()


def test_kl_term_adds_to_the_loss():
    logp = _t([[-1.0, -1.0]])
    ref = _t([[-2.0, -1.0]])
    kw = dict(ref_logprobs=ref)
    base = alg.policy_loss(logp, logp, torch.zeros_like(logp), torch.ones(1, 2), **kw)
    with_kl = alg.policy_loss(
        logp, logp, torch.zeros_like(logp), torch.ones(1, 2), kl_coef=0.5, **kw
    )
    k3 = math.exp(-1) + 1 - 1
    assert base.loss.item() == 0.0
    assert with_kl.loss.item() == pytest.approx(0.5 * k3 / 2)
    assert with_kl.metrics["kl"] == pytest.approx(k3 / 2)


def test_metrics_entropy_and_mismatch():
    logp = _t([[-1.0, -2.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = alg.policy_loss(
        logp,
        logp,
        torch.zeros_like(logp),
        mask,
        entropies=_t([[0.5, 1.5, 100.0]]),
        rollout_logprobs=_t([[-1.1, -1.7, 0.0]]),
    )
    assert out.metrics["entropy"] == pytest.approx(1.0)
    assert out.metrics["logprob_mismatch_mean"] == pytest.approx(0.2)
    assert out.metrics["logprob_mismatch_max"] == pytest.approx(0.3)
    assert out.metrics["tokens"] == 2


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="advantages has shape"):
        alg.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 3))
