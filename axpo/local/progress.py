"""Live progress of ``axpo run``: a rich bar with ETA and the latest step's headline numbers,
or one plain line per step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from axpo.settings.job import JobSpec


def rich_bar(out: IO[str], fields: str) -> Any:
    """A rich progress bar on ``out``: description, bar, done/total, elapsed, ETA, then the
    ``fields`` text column (e.g. ``"loss {task.fields[loss]}"``). Not started."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn(fields),
        console=Console(file=out),
        transient=False,
    )


class Progress:
    """Live progress with rich: step bar, ETA and the latest step's headline numbers."""

    def __init__(self, spec: JobSpec, out: IO[str], *, enabled: bool) -> None:
        self.spec = spec
        self.out = out
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        if enabled:
            self._progress = rich_bar(out, "{task.fields[stats]}")
            self._progress.start()
            self._task = self._progress.add_task(
                f"{spec.name} steps", total=spec.steps, stats="waiting for the first step"
            )

    def update(self, record: Mapping[str, Any]) -> None:
        stats = (
            f"reward {record.get('reward_mean', 0):.3f}  acc {record.get('accuracy', 0):.2f}  "
            f"tool {record.get('tool_call_rate', 0):.2f}  "
            f"all-wrong {record.get('all_wrong_tool_rate', 0):.2f}  "
            f"recov {record.get('recovery_rate', 0):.2f}  loss {record.get('loss', 0):+.4f}"
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=int(record["step"]), stats=stats)
        else:
            print(f"step {int(record['step'])}/{self.spec.steps}  {stats}", file=self.out)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
