"""``axpo bench TARGET``: the benchmarks (the queue's here; each service's in its package)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from axpo.cli.common import EXIT_OK, UsageError, load_service


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "queue":
        from axpo.queue import bench as queue_bench

        result = queue_bench.run(
            groups=args.groups, learner_step_s=args.learner_step_s, redis_url=args.redis_url
        )
        if args.json:
            print(json.dumps(result))
        else:
            queue_bench.print_table(result)
        return EXIT_OK
    if args.target == "learner" and args.memory:
        bench = load_service("learner", "memory_bench")
        try:
            lengths = tuple(int(n) for n in args.lengths.split(","))
        except ValueError as exc:
            raise UsageError(
                f"--lengths: {args.lengths!r} is not comma-separated integers"
            ) from exc
        if not lengths or min(lengths) < 2 or args.chunk_tokens < 1:
            raise UsageError("--lengths must be >= 2 and --chunk-tokens >= 1")
        result = bench.run(lengths, chunk_tokens=args.chunk_tokens)
        if args.json:
            print(json.dumps(result))
        else:
            bench.print_table(result)
        return EXIT_OK
    bench = load_service(args.target, "bench")
    if args.target == "api":
        result = bench.run(watchers=args.watchers)
    elif args.target == "learner":
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
