"""``axpo run CONFIG``, ``axpo job check CONFIG`` (validate a spec) and the control-plane
commands ``axpo job submit/status/watch/list/cancel/metrics`` (through ``axpo_client``, imported
in the handlers: the core does not depend on it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from axpo.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError


def cmd_run(args: argparse.Namespace) -> int:
    from axpo.local import launcher
    from axpo.local.processes import Interrupted, RunError
    from axpo.settings.job import JobSpecError

    try:
        summary = launcher.run(args.config, run_dir=args.run_dir, progress=not args.no_progress)
    except JobSpecError as exc:
        raise UsageError(str(exc)) from exc
    except RunError as exc:
        print(f"axpo run: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Interrupted as exc:
        print(f"axpo run: stopped by {exc}; every process was stopped", file=sys.stderr)
        return 128 + exc.signum
    print(json.dumps(summary))
    return EXIT_OK


def cmd_job_check(args: argparse.Namespace) -> int:
    from axpo.settings.job import JobSpecError, load_job_spec

    try:
        spec = load_job_spec(args.file)
    except JobSpecError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    return EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    try:
        from axpo_client import Client
    except ModuleNotFoundError as exc:
        raise UsageError("the api client is not installed: pip install -e clients/python") from exc
    return Client(args.url, args.token)


def _print_job(job: Any) -> None:
    print(job.model_dump_json())


def cmd_job_api(args: argparse.Namespace) -> int:
    """``axpo job submit|status|watch|list|cancel|metrics``: one JSON document on stdout (a
    job, a page of jobs, or the step records); errors on stderr, exit 1 (2 for bad input)."""
    from axpo_client import ApiError, ValidationError

    action = args.job_command
    try:
        with _client(args) as client:
            if action == "submit":
                job = client.submit(args.config)
                if args.watch:
                    job = client.wait(job.id, progress=not args.no_progress)
                _print_job(job)
                return EXIT_OK if job.state != "failed" else EXIT_FAILURE
            if action == "status":
                _print_job(client.get(args.id))
            elif action == "watch":
                job = client.wait(args.id, progress=not args.no_progress)
                _print_job(job)
                return EXIT_OK if job.state != "failed" else EXIT_FAILURE
            elif action == "list":
                print(client.list(args.state, limit=args.limit).model_dump_json())
            elif action == "cancel":
                _print_job(client.cancel(args.id))
            elif action == "metrics":
                records = client.metrics(args.id)
                if args.json:
                    print(json.dumps(records))
                else:
                    for r in records:
                        print(json.dumps(r))
    except ValidationError as exc:
        print(f"axpo job {action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ApiError, ValueError, RuntimeError) as exc:
        print(f"axpo job {action}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def add_api_parsers(job_sub: Any) -> None:
    """The control-plane actions under ``axpo job``."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="api base URL (default: AXPO_API_URL, http://127.0.0.1:8000)")
        p.add_argument("--token", help="bearer token (default: AXPO_API_TOKEN)")
        p.set_defaults(handler=cmd_job_api)

    submit = job_sub.add_parser("submit", help="submit a YAML job spec to the api; prints the job")
    submit.add_argument("config", type=Path, help="YAML job spec")
    submit.add_argument("--watch", action="store_true", help="then follow it until it finishes")
    submit.add_argument("--no-progress", action="store_true", help="with --watch: no progress")
    common(submit)
    status = job_sub.add_parser("status", help="print a job (state, step, last step record)")
    status.add_argument("id")
    common(status)
    watch = job_sub.add_parser("watch", help="follow a job with a progress bar until it ends")
    watch.add_argument("id")
    watch.add_argument("--no-progress", action="store_true", help="no progress display")
    common(watch)
    listing = job_sub.add_parser("list", help="list jobs, newest first")
    listing.add_argument(
        "--state", choices=["queued", "running", "succeeded", "failed", "cancelled"]
    )
    listing.add_argument("--limit", type=int, default=50)
    common(listing)
    cancel = job_sub.add_parser("cancel", help="cancel a job (409 if it already finished)")
    cancel.add_argument("id")
    common(cancel)
    metrics = job_sub.add_parser("metrics", help="a job's step records (metrics.jsonl lines)")
    metrics.add_argument("id")
    metrics.add_argument("--json", action="store_true", help="one JSON array instead of lines")
    common(metrics)
