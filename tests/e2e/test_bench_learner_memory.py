"""``axpo bench learner --memory``: one micro-batch of a model with Qwen3-VL-2B's vocabulary and
hidden size (two layers) through the old loss path and the lean one, each in its own process.
Memory is not asserted here (a short sequence on a shared machine), only that both paths ran,
computed the same loss, and the figures are there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

AXPO = [sys.executable, "-m", "axpo"]
REPO = Path(__file__).resolve().parents[2]


def test_bench_learner_memory_runs_both_paths_to_the_same_loss():
    out = subprocess.run(
        [
            *AXPO,
            "bench",
            "learner",
            "--memory",
            "--lengths",
            "96",
            "--chunk-tokens",
            "32",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"]["vocab_size"] == 151_936
    assert result["model"]["hidden_size"] == 2048
    runs = {r["path"]: r for r in result["runs"]}
    assert set(runs) == {"old", "new"}
    assert all("peak_mib" in r for r in runs.values()), runs
    assert all(r["peak_mib"] > 0 for r in runs.values()), runs
    # The same micro-batch, the same loss: the lean path computes what the old one did.
    assert runs["new"]["loss"] == pytest.approx(runs["old"]["loss"], rel=1e-5)
    assert result["loss_path_ratio"]["96"] == pytest.approx(
        runs["new"]["peak_mib"] / runs["old"]["peak_mib"], abs=1e-3
    )


def test_bad_lengths_are_a_usage_error():
    out = subprocess.run(
        [*AXPO, "bench", "learner", "--memory", "--lengths", "1k"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    assert "--lengths" in out.stderr
