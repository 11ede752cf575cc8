"""``axpo run CONFIG`` and ``axpo job check CONFIG``: run a training job, validate a spec."""

from __future__ import annotations

import argparse
import json
import sys

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
