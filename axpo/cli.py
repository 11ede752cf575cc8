"""The ``axpo`` command line: one entry point for people, subcommands per capability.

Heavy and service-specific modules are imported inside the handlers, so ``axpo --help`` stays
fast and the core package never imports a service at module level. A service's handler loads
it by module name (:func:`_load_service`); a missing service package is a clear error that says
what to install.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

from axpo import __version__

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

    from axpo.domain import Image, Reward, RewardWeights, ScoreItem, ToolCall, ToolResult

    SettingsT = TypeVar("SettingsT", bound=BaseSettings)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Service name -> (module it lives in, the distribution that provides it).
_SERVICES = {
    "inference": ("axpo_inference", "services/inference"),
    "learner": ("axpo_learner", "services/learner"),
    "rollout": ("axpo_rollout", "services/rollout"),
    "tools": ("axpo_tools", "services/tools"),
    "verifier": ("axpo_verifier", "services/verifier"),
}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback, exit code 2."""


def _load_service(name: str, submodule: str) -> ModuleType:
    package, folder = _SERVICES[name]
    try:
        return importlib.import_module(f"{package}.{submodule}")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == package:
            raise UsageError(
                f"the {name} service is not installed: pip install -e {folder}"
            ) from exc
        raise


# --------------------------------------------------------------------------- serve


def _cmd_serve(args: argparse.Namespace) -> int:
    from axpo import config

    settings: (
        config.ToolsSettings
        | config.VerifierSettings
        | config.InferenceSettings
        | config.LearnerSettings
        | config.RolloutSettings
    )
    if args.model is not None and args.service not in ("inference", "learner"):
        raise UsageError("--model applies to the inference and learner services only")
    if args.service == "learner":
        settings = _settings_or_usage_error(config.LearnerSettings)
        if args.model is not None:
            settings = settings.model_copy(update={"model": str(args.model)})
        if not settings.model or not Path(settings.model).is_dir():
            raise UsageError(f"serve learner: --model {settings.model!r} is not a directory")
    elif args.service == "rollout":
        settings = _settings_or_usage_error(config.RolloutSettings)
        if not settings.job_spec:
            raise UsageError("serve rollout: set AXPO_ROLLOUT_JOB_SPEC to a job spec YAML")
    elif args.service == "tools":
        settings = _settings_or_usage_error(config.ToolsSettings)
    elif args.service == "inference":
        settings = _settings_or_usage_error(config.InferenceSettings)
        if args.model is not None:
            settings = settings.model_copy(update={"model": str(args.model)})
        if not settings.model:
            raise UsageError("serve inference: give --model DIR (or AXPO_INFERENCE_MODEL)")
        if not Path(settings.model).is_dir():
            raise UsageError(f"--model {settings.model}: not a directory")
    else:
        settings = _settings_or_usage_error(config.VerifierSettings)
    rpc = settings.rpc.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    settings = settings.model_copy(update={"rpc": rpc})
    _load_service(args.service, "server").serve(settings, port_file=args.port_file)
    return EXIT_OK


def _settings_or_usage_error(cls: type[SettingsT]) -> SettingsT:
    from pydantic import ValidationError

    from axpo.config import format_validation_error

    try:
        return cls()
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        raise UsageError(
            f"invalid settings (environment {prefix}*):\n{format_validation_error(exc)}"
        ) from exc


# --------------------------------------------------------------------------- tool


def _cmd_tool(args: argparse.Namespace) -> int:
    from axpo.config import ToolsSettings

    settings = _settings_or_usage_error(ToolsSettings)
    if args.server:
        result_json = _tool_remote(args)
    else:
        toolbox_mod = _load_service("tools", "toolbox")
        toolbox = toolbox_mod.Toolbox(settings)
        try:
            if args.tool_command == "list":
                print(json.dumps(toolbox.openai_specs(), indent=2, ensure_ascii=False))
                return EXIT_OK
            from axpo.domain import ToolCall

            images = _read_images(args.image)
            _check_arguments_json(args.arguments)
            result = toolbox.call(ToolCall("call_0", args.name, args.arguments), images)
            result_json = _tool_result_json(result, args.save_images)
        finally:
            toolbox.close()
    print(json.dumps(result_json, ensure_ascii=False))
    return EXIT_OK


def _check_arguments_json(raw: str) -> None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arguments must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError('--arguments must be a JSON object, e.g. \'{"query": "..."}\'')


def _read_images(paths: Sequence[Path]) -> list[Image]:
    import mimetypes

    from axpo.domain import Image

    images = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--image {path}: {exc.strerror}") from exc
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        images.append(Image.from_bytes(data, mime))
    return images


def _tool_result_json(result: ToolResult, save_dir: Path | None) -> dict[str, object]:
    saved = []
    if save_dir is not None and result.images:
        save_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            ext = "jpg" if image.mime_type == "image/jpeg" else "png"
            path = save_dir / f"result_{i}.{ext}"
            path.write_bytes(image.data)
            saved.append(str(path))
    return {
        "ok": result.error is None,
        "text": result.text,
        "images": len(result.images),
        "image_files": saved,
        "error": None
        if result.error is None
        else {"kind": result.error.kind.value, "message": result.error.message},
        "latency_ms": round(result.latency_ms, 2),
    }


def _tool_remote(args: argparse.Namespace) -> dict[str, object]:
    from axpo import convert
    from axpo.config import RpcClientSettings
    from axpo.domain import ToolCall
    from axpo.rpc.client import open_channel
    from axpo.v1 import tools_pb2, tools_pb2_grpc

    with open_channel(RpcClientSettings(target=args.server)) as channel:
        stub = tools_pb2_grpc.ToolServiceStub(channel)
        if args.tool_command == "list":
            specs = stub.ListTools(tools_pb2.ListToolsRequest()).tools
            return {
                "tools": [
                    {
                        "name": s.name,
                        "description": s.description,
                        "parameters": json.loads(s.parameters_json_schema),
                    }
                    for s in specs
                ]
            }
        _check_arguments_json(args.arguments)
        images = _read_images(args.image)
        response = stub.Call(
            tools_pb2.CallRequest(
                call=convert.tool_call_to_proto(ToolCall("call_0", args.name, args.arguments)),
                images=[convert.image_to_proto(i) for i in images],
            )
        )
    return _tool_result_json(convert.tool_result_from_proto(response.result), args.save_images)


# --------------------------------------------------------------------------- verify


def _parse_choices(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--choices must be a JSON list of strings: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise UsageError('--choices must be a JSON list of strings, e.g. \'["3", "4", "5"]\'')
    return tuple(value)


def _cmd_verify(args: argparse.Namespace) -> int:
    from axpo.config import VerifierSettings
    from axpo.domain import AnswerKind, RewardWeights, ScoreItem

    for flag, value in (("--rel-tol", args.rel_tol), ("--abs-tol", args.abs_tol)):
        if value is not None and not value >= 0:
            raise UsageError(f"{flag} must be a number >= 0, got {value}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UsageError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    item = ScoreItem(
        output=sys.stdin.read(),
        gold=args.gold,
        kind=AnswerKind(args.kind),
        choices=_parse_choices(args.choices),
        rel_tol=args.rel_tol,
        abs_tol=args.abs_tol,
        tool_calls=args.tool_calls,
        time_limit_s=args.time_limit,
    )
    settings = VerifierSettings(math_workers=1)
    weights = settings.reward_weights
    if args.format_weight is not None or args.tool_bonus_weight is not None:
        weights = RewardWeights(
            accuracy=weights.accuracy,
            format=weights.format if args.format_weight is None else args.format_weight,
            tool_bonus=(
                weights.tool_bonus if args.tool_bonus_weight is None else args.tool_bonus_weight
            ),
        )
    if args.server:
        reward = _verify_remote(args.server, item, weights)
    else:
        verifier_mod = _load_service("verifier", "verifier")
        with verifier_mod.Verifier(settings) as verifier:
            (reward,) = verifier.score([item], weights)
    print(
        json.dumps(
            {
                "correct": reward.correct,
                "reward": reward.total,
                "extracted": reward.extracted,
                "reason": reward.reason,
                "checker": reward.checker,
                "accuracy": reward.accuracy,
                "format": reward.format,
                "tool_bonus": reward.tool_bonus,
                "timed_out": reward.timed_out,
            },
            ensure_ascii=False,
        )
    )
    return EXIT_OK


def _verify_remote(target: str, item: ScoreItem, weights: RewardWeights) -> Reward:
    from axpo import convert
    from axpo.config import RpcClientSettings
    from axpo.rpc.client import open_channel
    from axpo.v1 import verifier_pb2, verifier_pb2_grpc

    channel = open_channel(RpcClientSettings(target=target))
    with channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        response = stub.Score(
            verifier_pb2.ScoreRequest(
                items=[convert.score_item_to_proto(item)],
                weights=convert.reward_weights_to_proto(weights),
            )
        )
    return convert.reward_from_proto(response.results[0].reward)


# --------------------------------------------------------------------------- bench


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "queue":
        from axpo import queue_bench

        result = queue_bench.run(
            groups=args.groups, learner_step_s=args.learner_step_s, redis_url=args.redis_url
        )
        if args.json:
            print(json.dumps(result))
        else:
            queue_bench.print_table(result)
        return EXIT_OK
    bench = _load_service(args.target, "bench")
    if args.target == "learner":
        result = bench.run(
            groups=args.groups,
            redis_url=args.redis_url,
            publish_versions=args.publish_versions,
            publish_only=args.publish_only,
        )
    elif args.target == "verifier":
        result = bench.run(items=args.items, math_items_n=args.math_items, rounds=args.rounds)
    elif args.target == "inference":
        result = bench.run(rounds=args.rounds)
    elif args.target == "rollout":
        model = Path(args.model) if args.model else None
        result = bench.run(
            model, questions=args.questions, group_size=args.group_size, rounds=args.rounds
        )
    else:
        result = bench.run(calls=args.calls)
    if args.json:
        print(json.dumps(result))
    else:
        bench.print_table(result)
    return EXIT_OK


# --------------------------------------------------------------------------- job


def _cmd_run(args: argparse.Namespace) -> int:
    from axpo import launcher
    from axpo.config import JobSpecError

    try:
        summary = launcher.run(args.config, run_dir=args.run_dir, progress=not args.no_progress)
    except JobSpecError as exc:
        raise UsageError(str(exc)) from exc
    except launcher.RunError as exc:
        print(f"axpo run: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except launcher.Interrupted as exc:
        print(f"axpo run: stopped by {exc}; every process was stopped", file=sys.stderr)
        return 128 + exc.signum
    print(json.dumps(summary))
    return EXIT_OK


def _cmd_job_check(args: argparse.Namespace) -> int:
    from axpo.config import JobSpecError, load_job_spec

    try:
        spec = load_job_spec(args.file)
    except JobSpecError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    return EXIT_OK


# --------------------------------------------------------------------------- model


def _cmd_model_tiny(args: argparse.Namespace) -> int:
    try:
        from axpo import tiny_model

        out = tiny_model.build_tiny_model(
            args.out, seed=args.seed, tie_word_embeddings=args.tie_word_embeddings
        )
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


def _cmd_model_warm_start(args: argparse.Namespace) -> int:
    from axpo.config import DEFAULT_SYSTEM_PROMPT, TaskSpec, ToolsSettings, ZoomSettings

    if not (args.model / "config.json").is_file():
        raise UsageError(f"model warm-start: --model {str(args.model)!r} is not a checkpoint")
    if args.steps < 1 or args.tasks < 1 or not 64 <= args.image_size <= 4096:
        raise UsageError("model warm-start: --steps and --tasks must be >= 1, --image-size 64-4096")
    toolbox_module = _load_service("tools", "toolbox")
    from axpo import warmstart

    # Small crops: a zoom result costs the tiny model a handful of image tokens.
    toolbox = toolbox_module.Toolbox(
        ToolsSettings(zoom=ZoomSettings(min_pixels=64 * 64, max_pixels=128 * 128))
    )
    tools = [s for s in toolbox.openai_specs() if s["function"]["name"] == warmstart.ZOOM_TOOL]

    def call_tool(call: ToolCall, images: Sequence[Image]) -> ToolResult:
        result: ToolResult = toolbox.call(call, images)
        return result

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
        )
    finally:
        toolbox.close()
    print(json.dumps(metrics))
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="axpo",
        description="Train vision-language models to think and use tools with RL (GRPO, AXPO).",
    )
    parser.add_argument("--version", action="version", version=f"axpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a service (gRPC) until SIGTERM")
    serve.add_argument("service", choices=sorted(_SERVICES), help="which service")
    serve.add_argument("--host", help="bind address (default from settings/env)")
    serve.add_argument("--port", type=int, help="port; 0 picks a free one")
    serve.add_argument("--port-file", type=Path, help="write the bound port to this file")
    serve.add_argument(
        "--model",
        type=Path,
        help="inference, learner: checkpoint directory (overrides settings/env)",
    )
    serve.set_defaults(handler=_cmd_serve)

    run = sub.add_parser(
        "run",
        help="run a training job: Redis, every service and the rollout workers as local "
        "processes, live progress, a report at the end",
        description="Runs the job in CONFIG on this machine (see axpo/launcher.py). Prints a JSON "
        "summary on stdout; exit 0 when every step trained, 1 when a process failed, 130 on "
        "Ctrl-C (every process is stopped first).",
    )
    run.add_argument("config", type=Path, help="YAML job spec (configs/*.yaml)")
    run.add_argument("--run-dir", type=Path, help="run folder (default runs/<job>-<time>)")
    run.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")
    run.set_defaults(handler=_cmd_run)

    verify = sub.add_parser(
        "verify",
        help="score one model output (read from stdin) against a reference answer",
        description="Reads the model output on stdin and prints one JSON object with correct, "
        "reward, extracted, reason. Exit 0 whenever a verdict was reached, 2 on bad arguments.",
    )
    verify.add_argument("--kind", required=True, choices=["choice", "number", "text", "math"])
    verify.add_argument("--gold", required=True, help="the reference answer")
    verify.add_argument("--choices", help='option texts as a JSON list, e.g. \'["red", "blue"]\'')
    verify.add_argument("--rel-tol", type=float, help="relative tolerance (number; default 1e-2)")
    verify.add_argument("--abs-tol", type=float, help="absolute tolerance (number; default 0)")
    verify.add_argument("--tool-calls", type=int, default=0, help="tool calls the rollout made")
    verify.add_argument("--time-limit", type=float, help="seconds for this item (default 2)")
    verify.add_argument("--format-weight", type=float, help="weight of the format reward")
    verify.add_argument("--tool-bonus-weight", type=float, help="weight of the tool-use bonus")
    verify.add_argument("--server", metavar="HOST:PORT", help="score through a running service")
    verify.set_defaults(handler=_cmd_verify)

    bench = sub.add_parser("bench", help="measure a component's throughput")
    bench.add_argument(
        "target", choices=["inference", "learner", "queue", "rollout", "tools", "verifier"]
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--items", type=int, default=20_000, help="non-math items per round")
    bench.add_argument("--math-items", type=int, default=200, help="math items per round")
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds (the best is reported; verifier, inference, rollout)",
    )
    bench.add_argument("--calls", type=int, default=50, help="calls per tool figure (tools)")
    bench.add_argument("--groups", type=int, default=200, help="groups through Redis (queue)")
    bench.add_argument(
        "--learner-step-s",
        type=float,
        default=2.0,
        help="assumed learner step time for the headroom figure (queue)",
    )
    bench.add_argument("--redis-url", help="an existing Redis (queue; default: a private one)")
    bench.add_argument("--questions", type=int, default=32, help="questions per batch (rollout)")
    bench.add_argument("--group-size", type=int, default=4, help="rollouts per question (rollout)")
    bench.add_argument(
        "--model", metavar="DIR", help="checkpoint (rollout; default: the warm tiny model if built)"
    )
    bench.add_argument(
        "--publish-versions", type=int, default=5, help="timed publications per transport (learner)"
    )
    bench.add_argument(
        "--publish-only", action="store_true", help="only the publication figures (learner)"
    )
    bench.set_defaults(handler=_cmd_bench)

    tool = sub.add_parser("tool", help="list the tools or call one (in-process or --server)")
    tool_sub = tool.add_subparsers(dest="tool_command", required=True, metavar="ACTION")
    tool_list = tool_sub.add_parser("list", help="print the tools' JSON Schemas")
    tool_list.add_argument("--server", metavar="HOST:PORT", help="ask a running tool server")
    tool_list.set_defaults(handler=_cmd_tool)
    call = tool_sub.add_parser(
        "call",
        help="run one tool call and print a JSON result",
        description="Prints one JSON object: ok, text, images (count), error (null or "
        "{kind, message}), latency_ms. Exit 0 whenever the tool answered, 2 on bad arguments.",
    )
    call.add_argument("name", help="tool name (image_zoom_in_tool, python, search)")
    call.add_argument("--arguments", required=True, help="the arguments as a JSON object")
    call.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="an image of the trajectory (repeat, in order: img_idx 0, 1, ...)",
    )
    call.add_argument("--save-images", type=Path, help="write returned images to this folder")
    call.add_argument("--server", metavar="HOST:PORT", help="call a running tool server")
    call.set_defaults(handler=_cmd_tool)

    job = sub.add_parser("job", help="work with job specs")
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    check = job_sub.add_parser("check", help="validate a YAML job spec and print it resolved")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=_cmd_job_check)

    model = sub.add_parser("model", help="build model checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    tiny = model_sub.add_parser(
        "tiny",
        help="build a tiny random-init Qwen3-VL checkpoint (offline, seconds) for tests/demos",
        description="Writes config, weights, tokenizer, chat template and processor configs to "
        "--out and prints one JSON object: out, parameters. The same seed gives identical files.",
    )
    tiny.add_argument("--out", type=Path, required=True, help="output directory (created)")
    tiny.add_argument("--seed", type=int, default=0, help="weight-init seed (default 0)")
    tiny.add_argument(
        "--tie-word-embeddings",
        action="store_true",
        help="share the input embedding with the output layer (as small real Qwen models do)",
    )
    tiny.set_defaults(handler=_cmd_model_tiny)
    warm = model_sub.add_parser(
        "warm-start",
        help="teach a checkpoint the answer/tool-call format on generated tasks (short SFT)",
        description="Trains on demonstrations of the zoom_digits tasks (half of them call "
        "image_zoom_in_tool; answers right about half the time), saves a complete checkpoint "
        "to --out and prints one JSON object of metrics.",
    )
    warm.add_argument("--model", type=Path, required=True, help="input checkpoint directory")
    warm.add_argument("--out", type=Path, required=True, help="output directory (created)")
    warm.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    warm.add_argument("--seed", type=int, default=0, help="seed of tasks and sampling")
    warm.add_argument("--image-size", type=int, default=256, help="task image side in pixels")
    warm.add_argument("--tasks", type=int, default=256, help="distinct tasks (default 256)")
    warm.set_defaults(handler=_cmd_model_warm_start)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        print(f"axpo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
