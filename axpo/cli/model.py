"""``axpo model tiny`` and ``axpo model warm-start``: build the tiny checkpoint, warm it up
(a short ``axpo sft`` on generated demonstrations, with its progress bar)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from axpo.contracts.domain import Image, ToolCall, ToolResult

from axpo.cli.common import EXIT_OK, UsageError, load_service
from axpo.cli.sft import StepBar


def cmd_model_tiny(args: argparse.Namespace) -> int:
    try:
        from axpo.study import tiny_model

        out = tiny_model.build_tiny_model(
            args.out,
            seed=args.seed,
            tie_word_embeddings=args.tie_word_embeddings,
            max_pixels=args.max_pixels,
        )
    except ValueError as exc:
        raise UsageError(f"model tiny: {exc}") from exc
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] in {
            "torch",
            "transformers",
            "tokenizers",
        }:
            raise UsageError(
                f"{exc.name} is not installed: pip install -r requirements-inference.txt"
            ) from exc
        raise
    print(json.dumps({"out": str(out), "parameters": tiny_model.count_parameters(out)}))
    return EXIT_OK


def cmd_model_warm_start(args: argparse.Namespace) -> int:
    from axpo.settings.job import DEFAULT_SYSTEM_PROMPT, TaskSpec
    from axpo.settings.tools import ToolsSettings, ZoomSettings

    if not (args.model / "config.json").is_file():
        raise UsageError(f"model warm-start: --model {str(args.model)!r} is not a checkpoint")
    if args.steps < 1 or args.tasks < 1 or not 64 <= args.image_size <= 4096:
        raise UsageError("model warm-start: --steps and --tasks must be >= 1, --image-size 64-4096")
    toolbox_module = load_service("tools", "toolbox")
    warmstart = load_service("learner", "warmstart")

    # Small crops: a zoom result costs the tiny model a handful of image tokens.
    toolbox = toolbox_module.Toolbox(
        ToolsSettings(zoom=ZoomSettings(min_pixels=64 * 64, max_pixels=128 * 128))
    )
    tools = [s for s in toolbox.openai_specs() if s["function"]["name"] == warmstart.ZOOM_TOOL]

    def call_tool(call: ToolCall, images: Sequence[Image]) -> ToolResult:
        result: ToolResult = toolbox.call(call, images)
        return result

    sft_format = load_service("learner", "sft.format")
    bar = StepBar("warm start")
    try:
        metrics = warmstart.warm_start(
            args.model,
            args.out,
            tools=tools,
            call_tool=call_tool,
            tasks=TaskSpec(count=args.tasks, seed=args.seed, image_size=args.image_size),
            system_prompt=DEFAULT_SYSTEM_PROMPT,
            steps=args.steps,
            seed=args.seed,
            on_step=bar,
        )
    except sft_format.SftInputError as exc:
        raise UsageError(f"model warm-start: {exc}") from exc
    finally:
        bar.close()
        toolbox.close()
    print(json.dumps(metrics))
    return EXIT_OK
