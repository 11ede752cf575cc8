"""The ``axpo`` command line: one entry point for people, subcommands per capability.

Heavy and service-specific modules are imported inside the handlers, so ``axpo --help`` stays
fast and the core package never imports a service at module level. A service's handler loads
it by module name (:func:`_load_service`); a missing service package is a clear error that says
what to install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from axpo import __version__
from axpo.cli.bench import cmd_bench
from axpo.cli.common import EXIT_USAGE, SERVICES, UsageError
from axpo.cli.deploy import cmd_deploy
from axpo.cli.evaluate import add_parser as add_eval_parser
from axpo.cli.jobs import add_api_parsers, cmd_job_check, cmd_run
from axpo.cli.model import cmd_model_tiny, cmd_model_warm_start
from axpo.cli.serve import cmd_serve
from axpo.cli.sft import add_parser as add_sft_parser
from axpo.cli.study import add_parsers as add_study_parsers
from axpo.cli.tool import cmd_tool
from axpo.cli.verify import cmd_verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="axpo",
        description="Train vision-language models to think and use tools with RL (GRPO, AXPO).",
    )
    parser.add_argument("--version", action="version", version=f"axpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a service (gRPC) until SIGTERM")
    serve.add_argument("service", choices=sorted(SERVICES), help="which service")
    serve.add_argument("--host", help="bind address (default from settings/env)")
    serve.add_argument("--port", type=int, help="port; 0 picks a free one")
    serve.add_argument("--port-file", type=Path, help="write the bound port to this file")
    serve.add_argument(
        "--model",
        type=Path,
        help="inference, learner: checkpoint directory (overrides settings/env)",
    )
    serve.set_defaults(handler=cmd_serve)

    run = sub.add_parser(
        "run",
        help="run a training job: Redis, every service and the rollout workers as local "
        "processes, live progress, a report at the end",
        description="Runs the job in CONFIG on this machine (see axpo/local/launcher.py). "
        "Prints a JSON summary on stdout; exit 0 when every step trained, 1 when a process "
        "failed, 130 on Ctrl-C (every process is stopped first).",
    )
    run.add_argument("config", type=Path, help="YAML job spec (configs/*.yaml)")
    run.add_argument("--run-dir", type=Path, help="run folder (default runs/<job>-<time>)")
    run.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")
    run.set_defaults(handler=cmd_run)

    deploy = sub.add_parser(
        "deploy",
        help="a deployment on this machine: Redis, the api, every service, the learner and "
        "rollout workers taking jobs submitted through the api (axpo job submit)",
        description="Starts a deployment as local processes (axpo/local/deployment.py): what "
        "compose.yaml runs in containers. Jobs are submitted through its api and run one at "
        "a time; each job's files go to DIR/jobs/<job id>/. Runs until Ctrl-C.",
    )
    deploy.add_argument("--model", type=Path, required=True, help="checkpoint directory served")
    deploy.add_argument(
        "--tiny", action="store_true", help="build the tiny random model at --model if missing"
    )
    deploy.add_argument(
        "--dir", type=Path, default=Path("deploy"), help="deployment folder (default deploy/)"
    )
    deploy.add_argument("--rollout-workers", type=int, default=1, help="rollout worker processes")
    deploy.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="restarts allowed per process within 10 minutes of its life (backoff)",
    )
    deploy.set_defaults(handler=cmd_deploy)

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
    verify.add_argument(
        "--explain",
        action="store_true",
        help="add 'explain': each extraction step and why the checker decided",
    )
    verify.set_defaults(handler=cmd_verify)

    bench = sub.add_parser("bench", help="measure a component's throughput")
    bench.add_argument(
        "target", choices=["api", "inference", "learner", "queue", "rollout", "tools", "verifier"]
    )
    bench.add_argument("--watchers", type=int, default=50, help="concurrent SSE watchers (api)")
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
    bench.add_argument(
        "--memory",
        action="store_true",
        help="peak memory of one micro-batch, old loss path vs the lean one (learner)",
    )
    bench.add_argument(
        "--lengths",
        default="1024,4096,8192",
        help="sequence lengths, comma-separated (learner --memory)",
    )
    bench.add_argument(
        "--chunk-tokens", type=int, default=256, help="the lean path's chunk (learner --memory)"
    )
    bench.set_defaults(handler=cmd_bench)

    add_eval_parser(sub)

    tool = sub.add_parser("tool", help="list the tools or call one (in-process or --server)")
    tool_sub = tool.add_subparsers(dest="tool_command", required=True, metavar="ACTION")
    tool_list = tool_sub.add_parser("list", help="print the tools' JSON Schemas")
    tool_list.add_argument("--server", metavar="HOST:PORT", help="ask a running tool server")
    tool_list.set_defaults(handler=cmd_tool)
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
    call.set_defaults(handler=cmd_tool)

    job = sub.add_parser("job", help="work with job specs and the jobs of a deployment (api)")
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    check = job_sub.add_parser("check", help="validate a YAML job spec and print it resolved")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=cmd_job_check)
    add_api_parsers(job_sub)

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
    tiny.add_argument(
        "--max-pixels",
        type=int,
        default=512 * 512,
        help="image processor pixel budget: larger images are downscaled (default 262144)",
    )
    tiny.set_defaults(handler=cmd_model_tiny)
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
    warm.set_defaults(handler=cmd_model_warm_start)
    add_sft_parser(sub)
    add_study_parsers(sub)
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
