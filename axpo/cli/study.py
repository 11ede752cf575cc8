"""``axpo demos`` (SFT demonstrations of the task families) and ``axpo study`` (the miniature
study: SFT, then GRPO and AXPO arms, evaluated on held-out questions)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from axpo.cli.common import EXIT_FAILURE, EXIT_OK, UsageError, load_service
from axpo.contracts.domain import Image, ToolCall, ToolResult


def add_parsers(sub: Any) -> None:
    demos = sub.add_parser(
        "demos",
        help="write SFT demonstrations (JSONL + images) of task families, solved with their "
        "tools or answered directly",
        description="Generates --per-family training-split questions of each family and one "
        "demonstration each (a share --tool-rate calls the family's tool through the real tool "
        "code; the rest answer directly with a guess), in the format `axpo sft` reads. The "
        "system prompt, offered tools, tool settings and image size come from --config. Prints "
        "one JSON object: path, demos, tool_demos, images, per_family.",
    )
    demos.add_argument("--config", type=Path, required=True, help="YAML job spec")
    demos.add_argument("--families", required=True, help="comma-separated task families")
    demos.add_argument("--per-family", type=int, default=400, help="demonstrations per family")
    demos.add_argument("--tool-rate", type=float, default=0.7, help="share that call the tool")
    demos.add_argument("--seed", type=int, default=0, help="first train seed and sampling seed")
    demos.add_argument("--out", type=Path, required=True, help="output JSONL (images beside it)")
    demos.set_defaults(handler=cmd_demos)

    study = sub.add_parser(
        "study",
        help="run a study: SFT once, then GRPO and AXPO arms from the same checkpoint over "
        "several seeds, each evaluated on held-out questions; writes report.md",
        description="Runs the study in CONFIG (configs/study-*.yaml; axpo/local/study.py). "
        "Stages that already ran with the same inputs are skipped, so rerunning continues a "
        "stopped study. Prints a JSON summary on stdout.",
    )
    study.add_argument("config", type=Path, help="YAML study spec")
    study.add_argument("--out", type=Path, help="study folder (default runs/study-<name>)")
    study.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")
    study.set_defaults(handler=cmd_study)


def cmd_demos(args: argparse.Namespace) -> int:
    from axpo.settings.job import JobSpecError, load_job_spec
    from axpo.settings.tools import ToolsSettings
    from axpo.study.demos import write_demos
    from axpo.study.tasks import families, tasks_for

    try:
        spec = load_job_spec(args.config)
    except JobSpecError as exc:
        raise UsageError(str(exc)) from exc
    names = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(names) - set(families()))
    if not names or unknown:
        raise UsageError(f"demos: unknown families {unknown}; known: {', '.join(families())}")
    if args.per_family < 1 or not 0 <= args.tool_rate <= 1 or args.seed < 0:
        raise UsageError("demos: --per-family >= 1, --tool-rate in [0, 1], --seed >= 0")
    toolbox_module = load_service("tools", "toolbox")
    toolbox = toolbox_module.Toolbox(ToolsSettings.model_validate(spec.run.tools))
    toolbox.start()
    try:
        offered = set(spec.rollout.tools)
        tools = [s for s in toolbox.openai_specs() if s["function"]["name"] in offered]

        def call_tool(call: ToolCall, images: Sequence[Image]) -> ToolResult:
            result: ToolResult = toolbox.call(call, images)
            return result

        tasks = tasks_for(names, "train", args.per_family, spec.tasks.image_size, args.seed)
        try:
            stats = write_demos(
                tasks,
                args.out,
                tools=tools,
                system_prompt=spec.rollout.system_prompt,
                call_tool=call_tool,
                tool_rate=args.tool_rate,
                seed=args.seed,
            )
        except ValueError as exc:
            print(f"axpo demos: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    finally:
        toolbox.close()
    print(
        json.dumps(
            {
                "path": str(stats.path),
                "demos": stats.demos,
                "tool_demos": stats.tool_demos,
                "images": stats.images,
                "per_family": stats.per_family,
            }
        )
    )
    return EXIT_OK


def cmd_study(args: argparse.Namespace) -> int:
    from axpo.local.processes import Interrupted, RunError
    from axpo.local.study import Study
    from axpo.settings.job import JobSpecError
    from axpo.settings.study import load_study_spec

    try:
        spec = load_study_spec(args.config)
    except JobSpecError as exc:
        raise UsageError(str(exc)) from exc
    out_dir = args.out or Path("runs") / f"study-{spec.name}"
    try:
        summary = Study(spec, out_dir, progress=not args.no_progress).run()
    except RunError as exc:
        print(f"axpo study: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Interrupted as exc:
        print(f"axpo study: stopped by {exc}; rerun to continue", file=sys.stderr)
        return 128 + exc.signum
    print(json.dumps(summary))
    return EXIT_OK
