"""`axpo study configs/study-ci.yaml` end to end (the CI cut of configs/study-tiny.yaml): the
tiny model is built, demonstrations written with the real tools, SFT'd, evaluated on held-out
questions, then GRPO, AXPO and the token-matched GRPO arm each run through `axpo run` and
evaluate their final policy; report.md compares them. A second invocation skips every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "study-ci.yaml"


def _study(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "axpo", "study", str(CONFIG), "--out", str(out), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )


def test_study_runs_every_stage_and_reports(tmp_path: Path) -> None:
    spec = yaml.safe_load(CONFIG.read_text())
    families = spec["families"]
    out = tmp_path / "study"
    proc = _study(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(summary["report"]) == out / "report.md"

    # SFT: a complete checkpoint, trained on demonstrations of every family.
    demos = [json.loads(x) for x in (out / "sft/demos/demos.jsonl").read_text().splitlines()]
    assert len(demos) == spec["demos"]["per_family"] * len(families)
    assert (out / "sft/model/config.json").is_file()
    sft = json.loads((out / "sft/done.json").read_text())["result"]
    assert sft["steps"] == spec["sft"]["steps"]
    sft_eval = json.loads((out / "sft/eval.json").read_text())
    assert set(sft_eval["families"]) == set(families)

    # Every arm ran, evaluated its final policy on held-out questions, logged its tokens.
    tokens = {}
    for arm in ("grpo", "axpo", "grpo-matched"):
        run = out / "arms" / arm / "seed-0"
        done = json.loads((run / "done.json").read_text())["result"]
        ev = json.loads((run / "eval.json").read_text())
        per_question = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
        assert ev["questions"] == len(per_question) == spec["eval"]["questions"] * len(families)
        assert {q["seed"] for q in per_question} >= {1_000_000}  # held-out seeds
        assert all(q["seed"] >= 1_000_000 for q in per_question)
        for k in spec["eval"]["k"]:
            assert 0 <= ev[f"pass_at_{k}"] <= 1
        tokens[arm] = done["generated_tokens"]
        assert tokens[arm] > 0
        assert done["steps"] == done["steps_run"]
    # The equal-compute arm ran the steps that match AXPO's tokens at GRPO's rate.
    grpo_steps = spec["job"]["steps"]
    expected = max(1, -(-grpo_steps * tokens["axpo"] // tokens["grpo"]))
    matched = json.loads((out / "arms/grpo-matched/seed-0/done.json").read_text())["result"]
    assert matched["steps_run"] == int(expected)

    report = (out / "report.md").read_text()
    for k in spec["eval"]["k"]:
        assert f"## Held-out Pass@{k}" in report
    for row in ("| sft (start) |", "| grpo |", "| axpo |", "| grpo-matched |"):
        assert row in report
    assert (out / "plots/pass_at_k.png").stat().st_size > 1000
    assert (out / "plots/curves.png").stat().st_size > 1000

    # Rerun: every stage is done, nothing runs again.
    again = _study(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "SFT:" not in again.stderr
    assert "evaluating" not in again.stderr
    assert "arm grpo" not in again.stderr
