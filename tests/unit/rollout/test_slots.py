"""QuestionSlots: a rollout worker's places for questions (axpo_rollout.worker)."""

from __future__ import annotations

import threading

import pytest

from axpo_rollout.worker import QuestionSlots


def test_a_resampling_group_gives_its_place_to_the_next_question() -> None:
    slots = QuestionSlots(sampling=2, resampling=1)
    a, b = slots.start(timeout=0), slots.start(timeout=0)
    assert a is not None
    assert b is not None
    assert slots.free() == 0
    assert slots.start(timeout=0) is None  # both places are sampling
    a.resampling()
    a.resampling()  # idempotent
    assert (slots.sampling, slots.total) == (1, 2)
    c = slots.start(timeout=0)
    assert c is not None
    # 2 sampling + 1 resampling: the total cap (3) is reached even if one more moves on.
    c.resampling()
    assert (slots.sampling, slots.total, slots.free()) == (1, 3, 0)
    a.done()
    a.done()  # idempotent
    assert (slots.sampling, slots.total, slots.free()) == (1, 2, 1)
    b.done()
    c.done()
    assert (slots.sampling, slots.total, slots.free()) == (0, 0, 2)


def test_zero_resampling_places_keep_a_group_in_its_place_until_done() -> None:
    slots = QuestionSlots(sampling=1, resampling=0)
    a = slots.start(timeout=0)
    assert a is not None
    a.resampling()
    assert slots.start(timeout=0) is None
    a.done()
    assert slots.start(timeout=0) is not None


def test_start_waits_for_a_place() -> None:
    slots = QuestionSlots(sampling=1, resampling=0)
    a = slots.start(timeout=0)
    assert a is not None
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(slots.start(timeout=10)))
    waiter.start()
    waiter.join(0.1)
    assert waiter.is_alive()  # still waiting
    a.done()
    waiter.join(5)
    assert got
    assert got[0] is not None


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="sampling >= 1"):
        QuestionSlots(0, 1)
    with pytest.raises(ValueError, match="resampling >= 0"):
        QuestionSlots(1, -1)
