"""``axpo serve SERVICE``: run one service until SIGTERM."""

from __future__ import annotations

import argparse
import faulthandler
from pathlib import Path

from axpo.cli.common import EXIT_OK, UsageError, load_service, settings_or_usage_error


def cmd_serve(args: argparse.Namespace) -> int:
    # A crash in native code (gRPC, torch, vLLM) leaves each thread's Python stack in the
    # service's log instead of a bare exit code.
    faulthandler.enable()
    if args.service == "api":
        return _serve_api(args)
    from axpo.settings.inference import InferenceSettings
    from axpo.settings.learner import LearnerSettings
    from axpo.settings.rollout import RolloutSettings
    from axpo.settings.tools import ToolsSettings
    from axpo.settings.verifier import VerifierSettings

    settings: (
        ToolsSettings | VerifierSettings | InferenceSettings | LearnerSettings | RolloutSettings
    )
    if args.model is not None and args.service not in ("inference", "learner"):
        raise UsageError("--model applies to the inference and learner services only")
    if args.service == "learner":
        settings = settings_or_usage_error(LearnerSettings)
        if args.model is not None:
            settings = settings.model_copy(update={"model": str(args.model)})
        if not settings.model or not Path(settings.model).is_dir():
            raise UsageError(f"serve learner: --model {settings.model!r} is not a directory")
        if settings.job_store and not settings.jobs_dir:
            raise UsageError(
                "serve learner: AXPO_LEARNER_JOB_STORE needs AXPO_LEARNER_JOBS_DIR (where each "
                "job's files go)"
            )
    elif args.service == "rollout":
        settings = settings_or_usage_error(RolloutSettings)
        if not settings.job_spec and not settings.job_store:
            raise UsageError(
                "serve rollout: set AXPO_ROLLOUT_JOB_SPEC to a job spec YAML, or "
                "AXPO_ROLLOUT_JOB_STORE=true to follow the deployment's jobs"
            )
    elif args.service == "tools":
        settings = settings_or_usage_error(ToolsSettings)
    elif args.service == "inference":
        settings = settings_or_usage_error(InferenceSettings)
        if args.model is not None:
            settings = settings.model_copy(update={"model": str(args.model)})
        if not settings.model:
            raise UsageError("serve inference: give --model DIR (or AXPO_INFERENCE_MODEL)")
        if not Path(settings.model).is_dir():
            raise UsageError(f"--model {settings.model}: not a directory")
    else:
        settings = settings_or_usage_error(VerifierSettings)
    rpc = settings.rpc.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    settings = settings.model_copy(update={"rpc": rpc})
    load_service(args.service, "server").serve(settings, port_file=args.port_file)
    return EXIT_OK


def _serve_api(args: argparse.Namespace) -> int:
    """HTTP, not gRPC: its host and port are top-level settings, and it needs a token."""
    from axpo.settings.api import ApiSettings

    if args.model is not None:
        raise UsageError("--model applies to the inference and learner services only")
    settings = settings_or_usage_error(ApiSettings)
    settings = settings.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    try:
        settings.all_tokens()
    except ValueError as exc:
        raise UsageError(f"serve api: {exc}") from exc
    load_service("api", "server").serve(settings, port_file=args.port_file)
    return EXIT_OK
