"""``axpo verify``: score one answer by hand, in-process or against a running verifier."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from axpo.contracts.domain import Reward, RewardWeights, ScoreItem

from axpo.cli.common import EXIT_OK, UsageError, load_service


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


def cmd_verify(args: argparse.Namespace) -> int:
    from axpo.contracts.domain import AnswerKind, RewardWeights, ScoreItem
    from axpo.settings.verifier import VerifierSettings

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
    if args.explain and args.server:
        raise UsageError("--explain runs the verifier in this process; drop --server")
    explain: list[str] = []
    if args.explain:
        extract_mod = load_service("verifier", "extract")
        extract_mod.extract_answer(item.output, explain)
    if args.server:
        reward = _verify_remote(args.server, item, weights)
    else:
        verifier_mod = load_service("verifier", "verifier")
        with verifier_mod.Verifier(settings) as verifier:
            (reward,) = verifier.score([item], weights)
    result: dict[str, object] = {
        "correct": reward.correct,
        "reward": reward.total,
        "extracted": reward.extracted,
        "reason": reward.reason,
        "checker": reward.checker,
        "accuracy": reward.accuracy,
        "format": reward.format,
        "tool_bonus": reward.tool_bonus,
        "timed_out": reward.timed_out,
    }
    if args.explain:
        explain.append(
            f"checker {reward.checker}: {'correct' if reward.correct else 'wrong'}: {reward.reason}"
        )
        result["explain"] = explain
    print(json.dumps(result, ensure_ascii=False))
    return EXIT_OK


def _verify_remote(target: str, item: ScoreItem, weights: RewardWeights) -> Reward:
    from axpo.contracts import convert
    from axpo.rpc.client import open_channel
    from axpo.settings.base import RpcClientSettings
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
