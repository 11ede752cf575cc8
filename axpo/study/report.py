"""The run report: plots and a markdown summary from a run's ``metrics.jsonl``.

``run_dir/metrics.jsonl`` holds one JSON object per optimizer step: ``"step"`` plus the
diagnostic keys (:mod:`axpo.algorithm.diagnostics`) and the learner's keys (``loss``, ``train_s``,
``publish_s``, ``queue_wait_s``, ...). Any key may be missing or null in any record; a plot
whose keys are all missing is left out and the report says so. A record without ``"step"``
takes its line's position (0-based) as its step; when a step appears twice (a run resumed
from a checkpoint re-logs steps) the later record wins. A torn last line (a crash mid-write)
is skipped; any other line that is not a JSON object is an error.

:func:`write_report` writes ``run_dir/plots/*.png`` and ``run_dir/report.md``. matplotlib
(the ``report`` extra) is imported only there, and drawn with the Agg canvas directly, so no
GUI backend or pyplot global state is involved.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "Plot", "load_metrics", "write_report"]


@dataclass(frozen=True)
class Plot:
    """One figure: ``keys`` drawn as lines (or stacked bars with ``stacked``) against step."""

    name: str
    title: str
    keys: tuple[str, ...]
    ylabel: str
    stacked: bool = False


TIME_KEYS: tuple[str, ...] = (
    "time.generate_s",
    "time.tools_s",
    "time.verify_s",
    "queue_wait_s",
    "train_s",
    "publish_s",
)

PLOTS: tuple[Plot, ...] = (
    Plot("reward", "Mean reward (original rollouts)", ("reward_mean",), "reward"),
    Plot(
        "accuracy",
        "Accuracy (original rollouts)",
        ("accuracy", "accuracy_with_tools", "accuracy_without_tools"),
        "share correct",
    ),
    Plot("tool_call_rate", "Tool-call rate", ("tool_call_rate",), "share of rollouts"),
    Plot(
        "all_wrong_tool_rate",
        "All-wrong tool subgroups",
        ("all_wrong_tool_rate",),
        "share of groups",
    ),
    Plot(
        "recovery",
        "AXPO recovery and cost",
        ("recovery_rate", "resample_token_share"),
        "share",
    ),
    Plot(
        "tool_errors",
        "Tool errors",
        ("tool_error_rate", "malformed_call_rate"),
        "share of tool calls",
    ),
    Plot("loss", "Policy loss", ("loss",), "loss"),
    # Rollout phases are the worker's mean seconds per group; the learner's are per step.
    Plot("time_split", "Time split per step", TIME_KEYS, "seconds", stacked=True),
)
"""The report's figures, in order."""

MAX_BARS = 100
"""Above this many steps the stacked time split is drawn as areas, not bars."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file, sorted by ``"step"`` (rules: module docstring)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[float, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line
            raise ValueError(f"{path}:{i + 1}: not JSON: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        step = _number(record.get("step"))
        if step is None:
            step = float(i)
        by_step[step] = {**record, "step": step}
    return [by_step[s] for s in sorted(by_step)]


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps: list[float] = []
    values: list[float] = []
    for r in records:
        v = _number(r.get(key))
        if v is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _draw(plot: Plot, records: Sequence[dict[str, Any]], out: Path) -> bool:
    """Draw ``plot`` into ``out``; False (nothing written) when none of its keys has data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {k: _series(records, k) for k in plot.keys}
    present = [k for k in plot.keys if series[k][1]]
    if not present:
        return False
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if plot.stacked:
        steps = [r["step"] for r in records]
        stacks = [[_number(r.get(k)) or 0.0 for r in records] for k in present]
        if len(steps) > MAX_BARS:
            ax.stackplot(steps, stacks, labels=present)
        else:
            width = 0.8 * min((b - a for a, b in pairwise(steps)), default=1.0)
            bottom = [0.0] * len(steps)
            for k, heights in zip(present, stacks, strict=True):
                ax.bar(steps, heights, width=width, bottom=bottom, label=k)
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    else:
        for k in present:
            xs, ys = series[k]
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=k)
    ax.set_title(plot.title)
    ax.set_xlabel("step")
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3)
    if len(plot.keys) > 1:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out, format="png")
    return True


def _code_block(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text.rstrip()}\n{fence}"


EVAL_KEYS = (
    "accuracy",
    "tool_call_rate",
    "tool_call_valid_rate",
    "accuracy_with_tools",
    "accuracy_without_tools",
)


def _eval_section(run_dir: Path) -> list[str]:
    """The held-out evaluation (``eval-before.json`` / ``eval.json``, written by ``axpo run``
    with the job's ``eval``): one row per family and overall, before and after training."""
    found = [
        (label, json.loads((run_dir / name).read_text()))
        for label, name in (("before", "eval-before.json"), ("after", "eval.json"))
        if (run_dir / name).is_file()
    ]
    if not found:
        return []
    ks = sorted({k for _, e in found for k in e if k.startswith("pass_at_")})
    keys = [*ks, *EVAL_KEYS]
    first = found[0][1]
    lines = [
        "",
        "## Held-out evaluation",
        "",
        f"{first.get('questions', '?')} {first.get('split', '')} questions, "
        f"n = {first.get('n', '?')} samples each (``axpo eval``; Pass@k unbiased from n).",
        "",
        "| policy | family | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for label, summary in found:
        rows = [*summary.get("families", {}).items(), ("all", summary)]
        for family, row in rows:
            cells = [_fmt(v) if (v := _number(row.get(k))) is not None else "—" for k in keys]
            lines.append(f"| {label} | {family} | " + " | ".join(cells) + " |")
    return lines


def eval_points(run_dir: Path, final_step: int | None) -> list[tuple[int, dict[str, Any]]]:
    """(step, summary) of every held-out evaluation of a run, in step order: ``eval-before``
    at 0, ``evals/step-<N>`` during training, ``eval`` at ``final_step``."""
    points: list[tuple[int, dict[str, Any]]] = []
    if (run_dir / "eval-before.json").is_file():
        points.append((0, json.loads((run_dir / "eval-before.json").read_text())))
    for path in (run_dir / "evals").glob("step-*.json"):
        summary = json.loads(path.read_text())
        points.append((int(summary.get("step", path.stem.split("-")[1])), summary))
    if final_step is not None and (run_dir / "eval.json").is_file():
        points.append((final_step, json.loads((run_dir / "eval.json").read_text())))
    return sorted(points, key=lambda p: p[0])


def _draw_eval_curve(run_dir: Path, final_step: int | None, out: Path) -> bool:
    """Held-out Pass@k and tool-call rate against the step; False when fewer than two
    evaluations exist."""
    points = eval_points(run_dir, final_step)
    if len(points) < 2:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({k for _, e in points for k in e if k.startswith("pass_at_")})
    keys += ["tool_call_rate", "tool_call_valid_rate"]
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in keys:
        pairs = [(step, v) for step, e in points if (v := _number(e.get(key))) is not None]
        xs = [step for step, _ in pairs]
        ys = [v for _, v in pairs]
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.set_title("Held-out evaluation during training")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out, format="png")
    return True


def write_report(run_dir: Path, *, title: str, config_text: str = "") -> Path:
    """Write ``run_dir/plots/<plot>.png`` and ``run_dir/report.md`` from
    ``run_dir/metrics.jsonl``; returns the report's path.

    The report holds ``title``, a table of first/last/mean (over the steps that have it) of
    every plotted metric, the plots as relative links, and ``config_text`` in a code block.
    Raises FileNotFoundError when there is no metrics file.
    """
    records = load_metrics(run_dir / "metrics.jsonl")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)

    lines = [f"# {title}", ""]
    if records:
        lines.append(
            f"{len(records)} optimizer steps logged, step {_fmt(records[0]['step'])} to "
            f"{_fmt(records[-1]['step'])}."
        )
    else:
        lines.append("No optimizer step logged yet.")
    lines += ["", "| metric | first | last | mean | steps |", "|---|---:|---:|---:|---:|"]
    for key in dict.fromkeys(k for p in PLOTS for k in p.keys):
        _, values = _series(records, key)
        if values:
            mean = math.fsum(values) / len(values)
            cells = [_fmt(values[0]), _fmt(values[-1]), _fmt(mean), str(len(values))]
        else:
            cells = ["—", "—", "—", "0"]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")

    lines += _eval_section(run_dir)
    final_step = int(records[-1]["step"]) if records else None
    if _draw_eval_curve(run_dir, final_step, plots_dir / "heldout.png"):
        lines += ["", "![Held-out evaluation during training](plots/heldout.png)"]
    else:
        (plots_dir / "heldout.png").unlink(missing_ok=True)
    lines += ["", "## Plots", ""]
    for plot in PLOTS:
        png = plots_dir / f"{plot.name}.png"
        if _draw(plot, records, png):
            lines += [f"### {plot.title}", "", f"![{plot.title}](plots/{png.name})", ""]
        else:
            png.unlink(missing_ok=True)  # a stale plot from an earlier report
            keys = ", ".join(f"`{k}`" for k in plot.keys)
            lines += [f"### {plot.title}", "", f"No data ({keys} not logged).", ""]

    if config_text.strip():
        lines += ["## Configuration", "", _code_block(config_text), ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report
