"""axpo_learner.batch: rows, placeholder expansion, packing by token budget, padding."""

from __future__ import annotations

import pytest
import torch

from axpo.contracts.domain import Group, Reward, Trajectory
from axpo.settings.job import AlgorithmSpec
from axpo_learner.batch import Row, collate, expand_placeholders, pack, rows_from_groups


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


def test_images_need_an_image_processor():
    g = Group("g", "q", (traj("a", 5, 1.0, images=("ab",)),))
    with pytest.raises(ValueError, match="references images but the learner has no image"):
        rows_from_groups([g], AlgorithmSpec())


@pytest.mark.parametrize(
    ("ids", "counts", "expanded", "where"),
    [
        ([5, 9, 6], [1], [5, 9, 6], [0, 1, 2]),
        ([9, 6], [3], [9, 9, 9, 6], [0, 3]),
        ([5, 9, 6, 9], [2, 3], [5, 9, 9, 6, 9, 9, 9], [0, 1, 3, 4]),
        ([5, 6], [], [5, 6], [0, 1]),
    ],
)
def test_expand_placeholders(ids, counts, expanded, where):
    assert expand_placeholders(ids, 9, counts) == (tuple(expanded), tuple(where))


@pytest.mark.parametrize(
    ("ids", "counts", "message"),
    [
        ([5, 9, 6], [], "1 image placeholders in token_ids for 0 images"),
        ([5, 9, 9, 6], [4], "2 image placeholders in token_ids for 1 images"),
        ([9], [0], "expands to 0 tokens"),
    ],
)
def test_expand_placeholders_refuses_mismatches(ids, counts, message):
    with pytest.raises(ValueError, match=message):
        expand_placeholders(ids, 9, counts)


def test_collate_keeps_each_rows_images_in_row_order():
    def row(tid: str, ids: tuple[int, ...], pixels: float | None) -> Row:
        n = len(ids)
        grid = None if pixels is None else torch.tensor([[1, 2, 2]])
        pv = None if pixels is None else torch.full((4, 3), pixels)
        return Row("g", tid, ids, (False,) * n, (0.0,) * n, 1.0, pv, grid)

    rows = [row("a", (1, 9, 2), 1.0), row("t", (1, 2, 3, 4), None), row("b", (9, 3), 2.0)]
    mb = collate(rows, pad_id=0, image_token_id=9)
    assert mb.pixel_values is not None
    assert mb.image_grid_thw is not None
    assert mb.pixel_values[:, 0].tolist() == [1.0] * 4 + [2.0] * 4
    assert mb.image_grid_thw.tolist() == [[1, 2, 2], [1, 2, 2]]
    assert mb.mm_token_type_ids is not None
    assert mb.mm_token_type_ids.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert mb.advantages.tolist() == [[1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]]
    assert set(mb.model_inputs()) == {
        "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"
    }  # fmt: skip
    assert set(collate(rows[1:2], pad_id=0).model_inputs()) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="need image_token_id"):
        collate(rows, pad_id=0)


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
