"""``axpo sft``: supervised fine-tuning on a demonstration file (the learner service's
``axpo_learner.sft``), with a live progress bar; ``axpo model warm-start`` shares the bar."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

from axpo.cli.common import EXIT_OK, UsageError, load_service


class StepBar:
    """A rich progress bar on ``out`` (stderr): steps done of the total, ETA, the last loss.
    Call it as the trainer's ``on_step``; :meth:`close` when done."""

    def __init__(self, description: str, out: IO[str] | None = None, enabled: bool = True):
        self.description = description
        self.out = out if out is not None else sys.stderr
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int, loss: float) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            from axpo.local.progress import rich_bar

            self._progress = rich_bar(self.out, "loss {task.fields[loss]}")
            self._progress.start()
            self._task = self._progress.add_task(
                self.description, total=total, completed=done - 1, loss="-"
            )
        self._progress.update(self._task, completed=done, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def sft_settings(args: argparse.Namespace) -> Any:
    """The :class:`~axpo.settings.sft.SftSettings` of the command line (UsageError if bad)."""
    from pydantic import ValidationError

    from axpo.settings.base import format_validation_error
    from axpo.settings.sft import SftSettings

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"sft: --steps must be >= 1, got {args.steps}")
    values = {
        "model": str(args.model),
        "data": str(args.data),
        "out": str(args.out),
        "eval_data": str(args.eval_data or ""),
        "steps": args.steps if args.steps is not None else 0,
        "epochs": args.epochs if args.epochs is not None else 1.0,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "save_every": args.save_every,
        "resume": args.resume,
        "train_vision": args.train_vision,
        "device": args.device,
        "dtype": args.dtype,
    }
    if args.warmup_steps is not None:
        values["warmup_steps"] = args.warmup_steps
    try:
        return SftSettings(**values)
    except ValidationError as exc:
        raise UsageError(f"sft: invalid arguments:\n{format_validation_error(exc)}") from exc


def cmd_sft(args: argparse.Namespace) -> int:
    settings = sft_settings(args)
    train = load_service("learner", "sft.train")
    sft_format = load_service("learner", "sft.format")
    bar = StepBar("sft", enabled=not args.no_progress)
    try:
        metrics = train.train(settings, bar)
    except sft_format.SftInputError as exc:
        raise UsageError(f"sft: {exc}") from exc
    finally:
        bar.close()
    if args.json:
        print(json.dumps(metrics))
    else:
        eval_part = f", eval loss {metrics['eval_loss']}" if "eval_loss" in metrics else ""
        print(
            f"trained {metrics['steps']} steps on {metrics['demos']} demonstrations in "
            f"{metrics['seconds']} s: loss {metrics['first_loss']} -> {metrics['last_loss']}"
            f"{eval_part}; model written to {metrics['out']}"
        )
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Register ``axpo sft`` on the top-level subparsers."""
    sft = sub.add_parser(
        "sft",
        help="supervised fine-tuning on a demonstration file (loss on assistant tokens)",
        description="Trains --model on the demonstrations in --data (JSON lines, chat style; "
        "format: services/learner/README.md) and writes a complete HF checkpoint to --out. "
        "Prints a summary, or one JSON object of metrics with --json. Exit 2 on bad input "
        "(the message names the file, line and problem).",
    )
    sft.add_argument("--model", required=True, help="input checkpoint directory")
    sft.add_argument("--data", required=True, help="demonstrations (.jsonl)")
    sft.add_argument("--out", required=True, help="output directory (checkpoints under it)")
    sft.add_argument("--eval-data", help="held-out demonstrations; their loss at the end")
    length = sft.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    sft.add_argument("--batch-size", type=int, default=8, help="demonstrations per step (8)")
    sft.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (1e-5)")
    sft.add_argument("--warmup-steps", type=int, help="default: a tenth of the steps, max 10")
    sft.add_argument("--seed", type=int, default=0, help="data order and torch seed (0)")
    sft.add_argument(
        "--save-every", type=int, default=0, help="training checkpoint every N steps (0: none)"
    )
    sft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    sft.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    sft.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    sft.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sft.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    sft.add_argument("--no-progress", action="store_true", help="no progress bar")
    sft.set_defaults(handler=cmd_sft)
