"""axpo_learner.loop.restart_version: the version a (re)started learner publishes at."""

from __future__ import annotations

import pytest

from axpo_learner.loop import restart_version


@pytest.mark.parametrize(
    ("current", "seen", "restored", "want"),
    [
        # A fresh start: the replicas serve the initial weights (version 0) or nothing known.
        (0, 0, False, None),
        (0, -1, False, None),
        # A fresh start while the replicas serve a version of an earlier, uncheckpointed life.
        (0, 3, False, 4),
        # Restored step 2's weights; the replicas serve version 2 (stopped cleanly), 3 (a step
        # published then lost), 1 (the last publication failed) or nothing known.
        (2, 2, True, 3),
        (2, 3, True, 4),
        (2, 1, True, 2),
        (2, -1, True, 2),
        # After an earlier re-publication the trainer's version is ahead of its step.
        (7, 7, True, 8),
    ],
)
def test_restart_version(current: int, seen: int, restored: bool, want: int | None) -> None:
    assert restart_version(current, seen, restored=restored) == want
