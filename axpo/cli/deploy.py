"""``axpo deploy``: a deployment as local processes (:mod:`axpo.local.deployment`)."""

from __future__ import annotations

import argparse
import sys

from axpo.cli.common import EXIT_FAILURE, EXIT_OK, UsageError


def cmd_deploy(args: argparse.Namespace) -> int:
    from axpo.local.deployment import deploy
    from axpo.local.processes import Interrupted, RunError
    from axpo.settings.job import RestartSpec

    if args.rollout_workers < 1:
        raise UsageError(f"--rollout-workers {args.rollout_workers}: must be >= 1")
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts {args.max_restarts}: must be >= 0")
    if not args.model.is_dir():
        if not args.tiny:
            raise UsageError(f"--model {args.model}: not a directory (add --tiny to build one)")
        from axpo.study import tiny_model

        tiny_model.build_tiny_model(args.model)
    try:
        deploy(
            args.model,
            args.dir,
            rollout_workers=args.rollout_workers,
            # Per 10 minutes of life: a process that ran that long starts its count again.
            restarts=RestartSpec(max=args.max_restarts, reset_after_s=600.0),
        )
    except (RunError, ValueError) as exc:
        print(f"axpo deploy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Interrupted as exc:
        print(f"axpo deploy: stopped by {exc}; every process was stopped", file=sys.stderr)
        return EXIT_OK
    return EXIT_OK
