"""axpo.study.report: plots and report.md from a small metrics.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from axpo.study.report import PLOTS, load_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, records: list[dict[str, object]], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def full_record(step: int) -> dict[str, object]:
    keys = {k for p in PLOTS for k in p.keys}
    return {"step": step, **{k: 0.1 * (step + 1) for k in sorted(keys)}}


def linked_pngs(report: str, run_dir: Path) -> list[Path]:
    return [run_dir / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)]


def test_full_report(tmp_path: Path) -> None:
    write_metrics(tmp_path, [full_record(s) for s in range(3)])
    path = write_report(tmp_path, title="AXPO tiny run", config_text="algorithm: axpo\nrho: 0.25")
    assert path == tmp_path / "report.md"
    report = path.read_text()
    assert report.startswith("# AXPO tiny run\n")
    for key in {k for p in PLOTS for k in p.keys}:
        assert f"`{key}`" in report
    # first / last / mean of reward_mean: 0.1, 0.3, 0.2 over 3 steps
    assert "| `reward_mean` | 0.1 | 0.3 | 0.2 | 3 |" in report
    pngs = linked_pngs(report, tmp_path)
    assert len(pngs) == len(PLOTS)
    for png in pngs:
        assert png.parent == tmp_path / "plots"
        assert png.read_bytes().startswith(PNG)
    assert "```\nalgorithm: axpo\nrho: 0.25\n```" in report


def test_missing_keys_are_tolerated(tmp_path: Path) -> None:
    # Step 0 has only diagnostics, step 1 adds the learner's loss, step 2 lacks "step" and has
    # a null; no tool-error or time keys at all except one; a torn last line is skipped.
    write_metrics(
        tmp_path,
        [
            {"step": 0, "reward_mean": 0.5, "accuracy": 0.25},
            {"step": 1, "reward_mean": 0.7, "loss": 1.5, "train_s": 2.0},
            {"accuracy": None, "tool_call_rate": 0.5},
        ],
        tail='{"step": 3, "rew',
    )
    report = write_report(tmp_path, title="partial").read_text()
    assert "| `reward_mean` | 0.5 | 0.7 | 0.6 | 2 |" in report
    assert "| `accuracy` | 0.25 | 0.25 | 0.25 | 1 |" in report
    assert "| `publish_s` | — | — | — | 0 |" in report
    for png in linked_pngs(report, tmp_path):
        assert png.read_bytes().startswith(PNG)
    drawn = {p.name for p in linked_pngs(report, tmp_path)}
    assert {"reward.png", "accuracy.png", "loss.png", "time_split.png"} <= drawn
    assert "tool_errors.png" not in drawn
    assert not (tmp_path / "plots" / "tool_errors.png").exists()
    assert "No data (`tool_error_rate`, `malformed_call_rate` not logged)." in report
    assert "## Configuration" not in report


def test_load_metrics_orders_steps_and_keeps_the_last_duplicate(tmp_path: Path) -> None:
    write_metrics(tmp_path, [{"step": 2, "loss": 1.0}, {"step": 1}, {"step": 2, "loss": 3.0}])
    records = load_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss")) for r in records] == [(1, None), (2, 3.0)]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        write_report(tmp_path, title="x")


def test_empty_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    report = write_report(tmp_path, title="empty", config_text="a: 1").read_text()
    assert "No optimizer step logged yet." in report
    assert linked_pngs(report, tmp_path) == []


def test_long_run_draws_the_time_split_as_areas(tmp_path: Path) -> None:
    records = [{"step": s, "train_s": 1.0, "time.generate_s": 2.0} for s in range(150)]
    write_metrics(tmp_path, records)
    report = write_report(tmp_path, title="long").read_text()
    assert [p.name for p in linked_pngs(report, tmp_path)] == ["time_split.png"]
    assert (tmp_path / "plots" / "time_split.png").read_bytes().startswith(PNG)


def _summary(pass_at_1: float, tool: float) -> dict[str, object]:
    row = {"pass_at_1": pass_at_1, "pass_at_4": min(1.0, 2 * pass_at_1), "accuracy": pass_at_1}
    row |= {"tool_call_rate": tool, "tool_call_valid_rate": 0.9}
    return {**row, "questions": 4, "n": 4, "split": "heldout", "families": {"arith": row}}


def test_held_out_evaluations_before_during_and_after(tmp_path: Path) -> None:
    from axpo.study.report import eval_points

    write_metrics(tmp_path, [full_record(s) for s in (1, 2, 3, 4)])
    (tmp_path / "eval-before.json").write_text(json.dumps(_summary(0.1, 0.5)))
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "step-2.json").write_text(json.dumps({**_summary(0.2, 0.6), "step": 2}))
    (tmp_path / "eval.json").write_text(json.dumps(_summary(0.375, 0.7)))
    assert [step for step, _ in eval_points(tmp_path, 4)] == [0, 2, 4]
    report = write_report(tmp_path, title="t").read_text()
    assert "## Held-out evaluation" in report
    assert "| before | arith | 0.1 | 0.2 |" in report
    assert "| after | all | 0.375 | 0.75 |" in report
    assert "![Held-out evaluation during training](plots/heldout.png)" in report
    assert (tmp_path / "plots" / "heldout.png").read_bytes()[:8] == PNG
    # Without evaluations: no section, no curve (and a stale curve is removed).
    for name in ("eval-before.json", "eval.json", "evals/step-2.json"):
        (tmp_path / name).unlink()
    report = write_report(tmp_path, title="t").read_text()
    assert "Held-out" not in report
    assert not (tmp_path / "plots" / "heldout.png").exists()
