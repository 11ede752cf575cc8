"""The study's ``report.md``: held-out Pass@k per arm and family with 95 % intervals, tool use,
compute, and training curves per arm (:mod:`axpo.local.study` writes the inputs).

Inputs, under the study folder: ``sft/eval.jsonl`` (the SFT checkpoint's per-question results),
``arms/<arm>/seed-<s>/`` with ``eval.jsonl`` / ``eval.json`` (the run's final policy),
``metrics.jsonl`` (per training step) and ``done.json`` (the run's summary: wall time, steps,
generated tokens).

Intervals: a question's Pass@k (the unbiased estimator from its n samples) is one observation;
an arm's observations are its questions over all its seeds. The 95 % interval is the mean plus
or minus 1.96 standard errors of those observations (normal approximation; with 3 seeds the
seed-to-seed spread is inside it only as far as it shows in the pooled questions, which the
report's per-seed column makes visible).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from axpo.settings.study import StudySpec
from axpo.study.report import load_metrics

CURVES = (
    ("reward_mean", "Mean reward"),
    ("tool_call_rate", "Tool-call rate"),
    ("all_wrong_tool_rate", "All-wrong tool subgroups"),
    ("recovery_rate", "AXPO recovery rate"),
    ("malformed_call_rate", "Malformed-call rate"),
    ("accuracy", "Training accuracy"),
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_ci(values: Sequence[float]) -> tuple[float, float] | None:
    """(mean, half-width of the 95 % normal interval); None without values."""
    if not values:
        return None
    m = math.fsum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, 1.96 * math.sqrt(var / len(values))


def _cell(values: Sequence[float]) -> str:
    got = mean_ci(values)
    if got is None:
        return "—"
    m, h = got
    return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} ± {h:.3f}"


def _rate(summaries: Sequence[dict[str, Any]], key: str) -> str:
    values = [s[key] for s in summaries if isinstance(s.get(key), int | float)]
    return f"{math.fsum(values) / len(values):.3f}" if values else "—"


class _Arm:
    def __init__(self, name: str, runs: list[Path], records: list[dict[str, Any]]) -> None:
        self.name = name
        self.runs = runs
        self.records = records  # per-question eval records, every seed

    def summaries(self) -> list[dict[str, Any]]:
        out = []
        for run in self.runs:
            path = run / "eval.json"
            if path.is_file():
                out.append(json.loads(path.read_text()))
        return out

    def done(self) -> list[dict[str, Any]]:
        out = []
        for run in self.runs:
            path = run / "done.json"
            if path.is_file():
                out.append(json.loads(path.read_text())["result"])
        return out


def _arms(study_dir: Path, spec: StudySpec) -> list[_Arm]:
    arms = []
    sft = study_dir / "sft"
    if (sft / "eval.jsonl").is_file():
        arms.append(_Arm("sft (start)", [sft], _read_jsonl(sft / "eval.jsonl")))
    for arm in spec.arms:
        runs = [study_dir / "arms" / arm.name / f"seed-{s}" for s in spec.seeds]
        runs = [r for r in runs if (r / "eval.jsonl").is_file()]
        records = [rec for r in runs for rec in _read_jsonl(r / "eval.jsonl")]
        arms.append(_Arm(arm.name, runs, records))
    return arms


def _pass_table(arms: Sequence[_Arm], families: Sequence[str], k: int) -> list[str]:
    key = f"pass_at_{k}"
    head = "| arm | seeds | " + " | ".join(families) + " | all |"
    lines = [head, "|---|---:|" + "---:|" * (len(families) + 1)]
    for arm in arms:
        cells = []
        for fam in [*families, None]:
            vals = [
                float(r[key])
                for r in arm.records
                if key in r and (fam is None or r["family"] == fam)
            ]
            cells.append(_cell(vals))
        lines.append(f"| {arm.name} | {len(arm.runs)} | " + " | ".join(cells) + " |")
    return lines


def _tool_table(arms: Sequence[_Arm], families: Sequence[str]) -> list[str]:
    keys = (
        "accuracy",
        "tool_call_rate",
        "tool_call_valid_rate",
        "accuracy_with_tools",
        "accuracy_without_tools",
        "chance",
    )
    lines = [
        "| arm | family | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for arm in arms:
        summaries = arm.summaries()
        for fam in [*families, "all"]:
            rows = (
                summaries
                if fam == "all"
                else [s.get("families", {}).get(fam, {}) for s in summaries]
            )
            lines.append(
                f"| {arm.name} | {fam} | " + " | ".join(_rate(rows, k) for k in keys) + " |"
            )
    return lines


def _compute_table(arms: Sequence[_Arm]) -> list[str]:
    lines = [
        "| arm | runs | steps per run | generated tokens (mean per run) | wall s (mean per run) |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in arms:
        done = arm.done()
        if not done or arm.name.startswith("sft"):
            continue
        steps = sorted({int(d.get("steps_run", d.get("steps", 0))) for d in done})
        tokens = math.fsum(float(d.get("generated_tokens", 0)) for d in done) / len(done)
        wall = math.fsum(float(d.get("wall_s", 0)) for d in done) / len(done)
        lines.append(
            f"| {arm.name} | {len(done)} | {', '.join(map(str, steps))} | {tokens:,.0f} | "
            f"{wall:,.0f} |"
        )
    return lines


def _curves(arms: Sequence[_Arm], out: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trained = [a for a in arms if not a.name.startswith("sft") and a.runs]
    if not trained:
        return False
    fig = Figure(figsize=(12, 6.5), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(CURVES):
        ax = fig.add_subplot(2, 3, i + 1)
        for arm in trained:
            by_step: dict[int, list[float]] = {}
            for run in arm.runs:
                for rec in load_metrics(run / "metrics.jsonl"):
                    v = rec.get(key)
                    if isinstance(v, int | float) and math.isfinite(v):
                        by_step.setdefault(int(rec["step"]), []).append(float(v))
            if by_step:
                steps = sorted(by_step)
                ax.plot(
                    steps,
                    [math.fsum(by_step[s]) / len(by_step[s]) for s in steps],
                    label=arm.name,
                )
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize="small")
    fig.suptitle("Training curves (mean over seeds)")
    fig.savefig(out, format="png")
    return True


def _pass_plot(arms: Sequence[_Arm], families: Sequence[str], ks: Sequence[int], out: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not any(a.records for a in arms):
        return False
    fig = Figure(figsize=(4.5 * len(ks), 3.8), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    groups = [*families, "all"]
    width = 0.8 / max(1, len(arms))
    for j, k in enumerate(ks):
        ax = fig.add_subplot(1, len(ks), j + 1)
        for i, arm in enumerate(arms):
            means, errs = [], []
            for fam in groups:
                vals = [
                    float(r[f"pass_at_{k}"])
                    for r in arm.records
                    if f"pass_at_{k}" in r and (fam == "all" or r["family"] == fam)
                ]
                got = mean_ci(vals) or (0.0, 0.0)
                means.append(got[0])
                errs.append(0.0 if math.isnan(got[1]) else got[1])
            xs = [g + i * width for g in range(len(groups))]
            ax.bar(xs, means, width=width, yerr=errs, capsize=2, label=arm.name)
        ax.set_xticks([g + width * (len(arms) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_title(f"Held-out Pass@{k} (95 % interval)", fontsize="medium")
        ax.set_ylim(0, 1)
        ax.grid(True, axis="y", alpha=0.3)
        if j == 0:
            ax.legend(fontsize="small")
    fig.savefig(out, format="png")
    return True


def write_study_report(study_dir: Path, spec: StudySpec, *, wall_s: float | None = None) -> Path:
    """Write ``study_dir/report.md`` (and its plots under ``plots/``); returns its path."""
    families = list(spec.families)
    ks = list(spec.eval.k)
    arms = _arms(study_dir, spec)
    plots = study_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    e = spec.eval
    lines = [
        f"# Study {spec.name}: SFT → GRPO vs SFT → AXPO",
        "",
        f"Families: {', '.join(families)}. Seeds: {', '.join(map(str, spec.seeds))}. "
        f"Held-out evaluation: {e.questions} {e.split} questions per family, n = {e.n} samples "
        f"each, Pass@k by the unbiased estimator; ± is a 95 % interval over questions and "
        "seeds pooled (see axpo/study/study_report.py).",
    ]
    if wall_s is not None:
        lines.append(f"Wall time of this `axpo study` invocation: {wall_s:,.0f} s.")
    sft_done = study_dir / "sft" / "done.json"
    if sft_done.is_file():
        sft = json.loads(sft_done.read_text())["result"]
        lines.append(
            f"SFT: {sft.get('steps', '?')} steps, loss {sft.get('first_loss', '?')} → "
            f"{sft.get('last_loss', '?')}, {sft.get('wall_s', '?')} s."
        )
    for k in ks:
        lines += ["", f"## Held-out Pass@{k}", "", *_pass_table(arms, families, k)]
    if _pass_plot(arms, families, ks, plots / "pass_at_k.png"):
        lines += ["", "![Held-out Pass@k](plots/pass_at_k.png)"]
    lines += [
        "",
        "## Tool use on the held-out questions (mean over seeds)",
        "",
        *_tool_table(arms, families),
        "",
        "## Compute per arm",
        "",
        *_compute_table(arms),
        "",
        "## Training curves",
        "",
    ]
    if _curves(arms, plots / "curves.png"):
        lines.append("![Training curves](plots/curves.png)")
    else:
        lines.append("No training run has finished yet.")
    report = study_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report
