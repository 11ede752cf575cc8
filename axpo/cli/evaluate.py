"""``axpo eval``: pass@k, accuracy and tool use of a checkpoint on generated questions, sampled
with a job's agent loop through the same services as training (started here as local
processes; ``axpo_rollout.evaluate`` does the work)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from axpo.cli.common import EXIT_FAILURE, EXIT_OK, UsageError, load_service

DEFAULT_CONFIG = Path("configs/tiny-cpu-axpo.yaml")
DEFAULT_KS = (1, 4)


def add_parser(sub: Any) -> None:
    """Register ``axpo eval`` on the top-level subparsers."""
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: pass@k, accuracy, tool use on held-out questions",
        description="Starts the verifier, tool and inference services (the job's settings), "
        "samples N rollouts per question with the job's agent loop (no AXPO resampling) and "
        "prints the overall and per-family figures: pass_at_<k> (unbiased, from N samples), "
        "accuracy, tool_call_rate, tool_call_valid_rate, accuracy_with_tools, "
        "accuracy_without_tools, mean_generated_tokens. Exit 0 on success, 1 when a service "
        "failed, 2 on bad arguments.",
    )
    ev.add_argument("--model", type=Path, help="checkpoint directory (default: the job's model)")
    ev.add_argument(
        "--tasks",
        required=True,
        metavar="FAMILY[,FAMILY]",
        help="task families, comma-separated (axpo.study.tasks.families())",
    )
    ev.add_argument("--split", default="heldout", choices=["train", "heldout"], help="which seeds")
    ev.add_argument("--questions", type=int, default=32, help="questions per family (32)")
    ev.add_argument("--n", type=int, default=8, help="samples per question (8)")
    ev.add_argument(
        "--k",
        metavar="K[,K]",
        help="pass@k for each k, comma-separated, each <= n (default: 1,4, those <= n)",
    )
    ev.add_argument(
        "--config",
        type=Path,
        help=f"job spec YAML: system prompt, tools, budgets, service settings ({DEFAULT_CONFIG})",
    )
    ev.add_argument("--temperature", type=float, help="sampling temperature (default: the job's)")
    ev.add_argument("--out", type=Path, help="write one JSON line per question here")
    ev.add_argument("--run-dir", type=Path, help="keep the services' logs here")
    for name in ("inference", "tools", "verifier"):
        ev.add_argument(
            f"--{name}",
            metavar="HOST:PORT",
            help=f"a running {name} service (all three or none: then nothing is started and "
            "--model only names the tokenizer; the weights are whatever inference serves)",
        )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(handler=cmd_eval)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: give at least one value")
    return values


def _config(path: Path | None) -> Path:
    if path is not None:
        return path
    import axpo

    for root in (Path.cwd(), Path(axpo.__file__).resolve().parent.parent):
        if (root / DEFAULT_CONFIG).is_file():
            return root / DEFAULT_CONFIG
    raise UsageError(f"no --config given and {DEFAULT_CONFIG} not found (run from the repo root)")


def _progress(total: int) -> Any:
    lock = threading.Lock()
    count = [0]

    def on_question(result: Any) -> None:
        with lock:
            count[0] += 1
            print(
                f"eval: {count[0]}/{total} questions ({result.task_id}: "
                f"{result.correct}/{result.n} correct)",
                file=sys.stderr,
                flush=True,
            )

    return on_question


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(result: dict[str, Any]) -> None:
    """People's view of the summary line."""
    pass_keys = [f"pass_at_{k}" for k in result["ks"]]
    cols = [
        *pass_keys,
        "accuracy",
        "tool_call_rate",
        "tool_call_valid_rate",
        "accuracy_with_tools",
        "accuracy_without_tools",
        "mean_generated_tokens",
        "chance",
    ]
    print(
        f"model {result['model']}: {result['questions']} {result['split']} questions x "
        f"n={result['n']} at temperature {result['temperature']} ({result['wall_s']} s)"
    )
    rows = [*result["families"].items(), ("overall", result)]
    width = max(len(name) for name, _ in rows)
    print(" " * width + "  " + "  ".join(f"{c:>{max(len(c), 6)}}" for c in cols))
    for name, row in rows:
        cells = "  ".join(f"{_fmt(row[c]):>{max(len(c), 6)}}" for c in cols)
        print(f"{name:<{width}}  {cells}")
    if result.get("out"):
        print(f"per-question results: {result['out']}")


def cmd_eval(args: argparse.Namespace) -> int:
    from axpo.settings.job import JobSpecError, load_job_spec

    families = [f.strip() for f in args.tasks.split(",") if f.strip()]
    try:
        spec = load_job_spec(_config(args.config))
    except JobSpecError as exc:
        raise UsageError(str(exc)) from exc
    model = args.model if args.model is not None else Path(spec.model)
    ks = _ints(args.k, "--k") if args.k else [k for k in DEFAULT_KS if k <= args.n]
    targets = [args.inference, args.tools, args.verifier]
    if any(targets) and not all(targets):
        raise UsageError("eval: give all of --inference, --tools, --verifier, or none")
    evaluate = load_service("rollout", "evaluate")
    progress = _progress(args.questions * len(families))
    try:
        if all(targets):
            result = evaluate.eval_running(
                *targets,
                spec,
                families=families,
                split=args.split,
                questions=args.questions,
                n=args.n,
                ks=ks,
                out_path=args.out,
                temperature=args.temperature,
                tokenizer=model,
                on_question=progress,
            )
        else:
            result = evaluate.run_eval(
                model,
                spec,
                families,
                args.split,
                args.questions,
                args.n,
                ks,
                args.out,
                temperature=args.temperature,
                run_dir=args.run_dir,
                on_question=progress,
            )
    except evaluate.EvalArgumentError as exc:
        raise UsageError(f"eval: {exc}") from exc
    except RuntimeError as exc:  # a service failed (RunError), did not answer, or a question
        print(f"axpo eval: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return EXIT_OK
