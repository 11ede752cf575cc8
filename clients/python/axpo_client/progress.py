"""The progress display of ``wait(progress=True)``: step/steps, reward, tool-call rate,
all-wrong rate and ETA; a rich progress bar when rich is importable, else one plain line per
step on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from axpo_client.models import Job


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _num(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return f"{value:.2f}" if isinstance(value, int | float) else "-"


def summary(job_id: str, step: int, steps: int, record: dict[str, Any], eta_s: float | None) -> str:
    """One progress line.

    >>> summary("j", 3, 10, {"reward_mean": 0.5, "tool_call_rate": 0.25}, 70)
    'j step 3/10 reward 0.50 tool-call rate 0.25 all-wrong rate - ETA 1m10s'
    """
    return (
        f"{job_id} step {step}/{steps} reward {_num(record, 'reward_mean')} "
        f"tool-call rate {_num(record, 'tool_call_rate')} "
        f"all-wrong rate {_num(record, 'all_wrong_tool_rate')} ETA {_fmt_eta(eta_s)}"
    )


class Progress:
    """Shows a job's progress from its step events."""

    def __init__(self, job: Job, stream: TextIO | None = None) -> None:
        self.job_id = job.id
        self.steps = max(job.steps, 1)
        self.stream = stream or sys.stderr
        self._first: tuple[int, float] | None = None
        self._bar: Any = None
        self._task: Any = None
        try:
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                console=None if stream is None else _console(stream),
                transient=False,
            )
            self._task = self._bar.add_task(job.id, total=self.steps, completed=job.step)
            self._bar.start()
        except ImportError:
            self._bar = None

    def step(self, record: dict[str, Any]) -> str:
        step = int(record.get("step", 0))
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
            eta = None
        else:
            done = step - self._first[0]
            eta = (now - self._first[1]) / done * (self.steps - step) if done > 0 else None
        line = summary(self.job_id, step, self.steps, record, eta)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=line)
        else:
            print(line, file=self.stream, flush=True)
        return line

    def close(self, job: Job) -> None:
        if self._bar is not None:
            self._bar.stop()
        print(f"{job.id} {job.state}" + (f": {job.error}" if job.error else ""), file=self.stream)


def _console(stream: TextIO) -> Any:
    from rich.console import Console

    return Console(file=stream)
