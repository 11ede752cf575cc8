"""axpo_learner.batch: rows, packing by token budget, padding."""

from __future__ import annotations

import pytest
import torch

from axpo.config import AlgorithmSpec
from axpo.domain import Group, Reward, Trajectory
from axpo_learner.batch import collate, pack, rows_from_groups


def traj(
    tid: str, n: int, reward: float, parent: str = "", frozen: int = 0, images: tuple[str, ...] = ()
) -> Trajectory:
    return Trajectory(
        trajectory_id=tid,
        token_ids=tuple(range(1, n + 1)),
        loss_mask=(False, False) + (True,) * (n - 2),
        logprobs=tuple(-0.1 * i for i in range(n)),
        entropies=(0.0,) * n,
        segments=(),
        prompt_length=2,
        reward=Reward(reward, reward > 0, reward, 0, 0, None, "", ""),
        resampled_from=parent,
        frozen_prefix_length=frozen,
        image_sha256=images,
    )


def test_rows_carry_advantages_and_frozen_masks():
    g = Group("g", "q", (traj("a", 5, 1.0), traj("b", 4, 0.0), traj("r", 6, 1.0, "b", 4)))
    rows = rows_from_groups([g], AlgorithmSpec())
    assert [r.trajectory_id for r in rows] == ["a", "b", "r"]
    assert rows[0].advantage > 0 > rows[1].advantage
    assert rows[2].loss_mask == (False,) * 4 + (True, True)
    rows = rows_from_groups([g], AlgorithmSpec(mask_frozen_prefix=False))
    assert rows[2].loss_mask == (False,) * 2 + (True,) * 4


def test_inconsistent_trajectory_is_refused():
    bad = Trajectory(
        "x", (1, 2, 3), (False, True), (0.0,) * 3, (0.0,) * 3, (), 1, reward=Reward.zero("r")
    )
    with pytest.raises(ValueError, match="loss_mask has 2 entries"):
        rows_from_groups([Group("g", "q", (bad,))], AlgorithmSpec())


def test_images_are_refused_for_now():
    g = Group("g", "q", (traj("a", 5, 1.0, images=("ab",)),))
    with pytest.raises(ValueError, match="references images"):
        rows_from_groups([g], AlgorithmSpec())


@pytest.mark.parametrize(
    ("lengths", "budget", "expected"),
    [
        ([4, 4, 4, 4], 8, [[4, 4], [4, 4]]),
        ([2, 8, 3], 8, [[8], [3, 2]]),
        ([10, 2], 8, [[10], [2]]),  # over-long row: alone
        ([3, 3, 3], 100, [[3, 3, 3]]),
    ],
)
def test_pack_respects_the_budget(lengths, budget, expected):
    g = Group("g", "q", tuple(traj(f"t{i}", n, float(i % 2)) for i, n in enumerate(lengths)))
    rows = rows_from_groups([g], AlgorithmSpec())
    got = [[len(r.token_ids) for r in chunk] for chunk in pack(rows, budget)]
    assert got == expected


def test_collate_pads_with_zero_mask():
    g = Group("g", "q", (traj("a", 5, 1.0), traj("b", 3, 0.0)))
    mb = collate(rows_from_groups([g], AlgorithmSpec()), pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    assert mb.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert mb.loss_mask.tolist() == [
        [False, False, True, True, True],
        [False, False, True, False, False],
    ]
    assert torch.equal(mb.advantages[1, 3:], torch.zeros(2))
