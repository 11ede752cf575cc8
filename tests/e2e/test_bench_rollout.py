"""``axpo bench rollout``: the services as subprocesses, GRPO and AXPO loops over gRPC, one
JSON object with every figure (the smallest batch: 2 questions x 2 rollouts). Speed is not
asserted here, only that the figures are there and sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.e2e

AXPO = [sys.executable, "-m", "axpo"]
REPO = Path(__file__).resolve().parents[2]

KEYS = {
    "model",
    "questions",
    "group_size",
    "grpo_step_s",
    "axpo_step_s",
    "axpo_vs_grpo_ratio",
    "axpo_speculative_step_s",
    "axpo_speculative_vs_grpo_ratio",
    "speculative_resumes",
    "speculative_waste_share",
    "trajectories_per_s",
    "axpo_trajectories_per_s",
    "tool_call_rate",
    "resampled_groups_share",
    "loop_overhead_share",
    "machine",
    "date",
    "definitions",
}
SHARES = (
    "tool_call_rate",
    "resampled_groups_share",
    "loop_overhead_share",
    "loop_overhead_share_simple",
    "first_turns_identical_share",
    "originals_identical_share",
    "speculative_waste_share",
)


def test_bench_rollout_prints_every_figure():
    out = subprocess.run(
        [
            *AXPO,
            "bench",
            "rollout",
            "--json",
            "--questions",
            "2",
            "--group-size",
            "2",
            "--rounds",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result.keys() >= KEYS
    assert result["questions"] == 2
    assert result["group_size"] == 2
    assert isinstance(result["model"], str)
    assert result["model"]
    for key in ("grpo_step_s", "axpo_step_s", "trajectories_per_s", "axpo_trajectories_per_s"):
        assert result[key] > 0, key
    assert result["axpo_vs_grpo_ratio"] > 0
    assert result["axpo_speculative_step_s"] > 0
    assert result["rounds"] == 1
    assert len(result["axpo_vs_grpo_ratio_by_round"]) == 1
    spec = result["speculative_resumes"]
    assert spec["used"] + spec["cancelled"] <= spec["launched"]
    for key in SHARES:
        assert 0.0 <= result[key] <= 1.0, key
    assert set(result["definitions"]) >= {"grpo_step_s", "axpo_step_s", "loop_overhead_share"}
    assert result["date"]
    assert "CPU" in result["machine"]
