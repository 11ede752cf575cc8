"""The verifier's real gRPC server on port 0, driven through the generated stub."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from axpo.rpc.client import open_channel, wait_for_health
from axpo.settings.base import RpcClientSettings, RpcServerSettings
from axpo.settings.verifier import VerifierSettings
from axpo.v1 import common_pb2 as pb
from axpo.v1 import verifier_pb2, verifier_pb2_grpc
from axpo_verifier.server import start
from axpo_verifier.verifier import Verifier

pytestmark = pytest.mark.integration

TIME_LIMIT_MS = 1500


@pytest.fixture(scope="module")
def stub():
    settings = VerifierSettings(
        rpc=RpcServerSettings(port=0, log_requests=False),
        default_time_limit_s=TIME_LIMIT_MS / 1000,
        math_workers=2,
    )
    with Verifier(settings) as verifier:
        running = start(settings, verifier)
        channel = open_channel(RpcClientSettings(target=running.address, deadline_s=60))
        wait_for_health(channel, timeout_s=10)
        yield verifier_pb2_grpc.VerifierServiceStub(channel)
        channel.close()
        running.stop(grace=1)


def item(item_id, output, gold, kind, **kw):
    return verifier_pb2.ScoreItem(item_id=item_id, output=output, gold=gold, kind=kind, **kw)


def test_scores_a_mixed_batch_in_order(stub):
    items = [
        item("choice", "<think>hmm</think>\n\nThe answer is (C).", "C", pb.ANSWER_KIND_CHOICE),
        item("number", "</think>\n\n<answer>3,200</answer>", "3200", pb.ANSWER_KIND_NUMBER),
        item("number-wrong", "</think>\n\nThe answer is 12.", "13", pb.ANSWER_KIND_NUMBER),
        item("text", "</think>\n\nThe answer is the Nile.", "Nile", pb.ANSWER_KIND_TEXT),
        item("math", "</think>\n\n$\\boxed{\\frac{2}{4}}$", "0.5", pb.ANSWER_KIND_MATH),
        item(
            "tolerant",
            "</think>\n\n<answer>104</answer>",
            "100",
            pb.ANSWER_KIND_NUMBER,
            rel_tol=0.05,
        ),
    ]
    response = stub.Score(verifier_pb2.ScoreRequest(items=items))
    got = {r.item_id: r.reward for r in response.results}
    assert [r.item_id for r in response.results] == [i.item_id for i in items]
    assert got["choice"].correct
    assert got["choice"].extracted == "C"
    assert got["number"].correct
    assert not got["number-wrong"].correct
    assert got["text"].correct
    assert got["math"].correct
    assert got["math"].checker == "math"
    assert got["tolerant"].correct
    for reward in got.values():
        assert reward.reason


def test_request_weights_override_defaults(stub):
    one = item(
        "x", "<think>a</think>\n\n<answer>7</answer>", "7", pb.ANSWER_KIND_NUMBER, tool_calls=1
    )
    default = stub.Score(verifier_pb2.ScoreRequest(items=[one])).results[0].reward
    weighted = (
        stub.Score(
            verifier_pb2.ScoreRequest(
                items=[one], weights=verifier_pb2.RewardWeights(format=0.0, tool_bonus=2.0)
            )
        )
        .results[0]
        .reward
    )
    assert default.total == pytest.approx(1.0 + 0.1 * default.format)
    assert weighted.total == pytest.approx(3.0)


def test_a_bad_item_does_not_fail_the_batch(stub):
    items = [
        item("no-kind", "42", "42", pb.ANSWER_KIND_UNSPECIFIED),
        item("neg-tol", "42", "42", pb.ANSWER_KIND_NUMBER, rel_tol=-0.5),
        item("fine", "</think>42", "42", pb.ANSWER_KIND_NUMBER),
    ]
    results = stub.Score(verifier_pb2.ScoreRequest(items=items)).results
    assert [r.item_id for r in results] == ["no-kind", "neg-tol", "fine"]
    assert "kind" in results[0].reward.reason
    assert not results[0].reward.correct
    assert "rel_tol" in results[1].reward.reason
    assert results[1].reward.total == 0
    assert results[2].reward.correct


HOSTILE = {
    "megabyte": "x" * 1_000_000 + "\n\\boxed{7}",
    "braces": "</think>\\boxed{" + "{" * 5000 + "7" + "}" * 5000 + "}",
    "control": "</think>\x00\x01\x1b[31m<answer>7\x07</answer>\x7f",
    "empty": "",
}


def test_hostile_items_cost_at_most_their_limit_and_the_service_survives(stub):
    items = [item(k, v, "7", pb.ANSWER_KIND_NUMBER) for k, v in HOSTILE.items()]
    items.append(
        item(
            "tower",
            "</think>\\boxed{9^{9^{9^{9^{9^{9}}}}}}",
            "1",
            pb.ANSWER_KIND_MATH,
            time_limit_ms=TIME_LIMIT_MS,
        )
    )
    items.append(item("ok-math", "</think>\\boxed{2}", "2", pb.ANSWER_KIND_MATH))
    start = time.monotonic()
    results = stub.Score(verifier_pb2.ScoreRequest(items=items)).results
    elapsed = time.monotonic() - start
    assert len(results) == len(items)
    by_id = {r.item_id: r.reward for r in results}
    assert not by_id["tower"].correct
    assert by_id["ok-math"].correct
    assert by_id["megabyte"].correct  # linear scans: a long output is still read
    assert not by_id["empty"].correct
    # All items run concurrently; the batch costs about one time limit, plus slack for this
    # shared 2-core machine.
    assert elapsed < TIME_LIMIT_MS / 1000 + 5
    # The service still answers.
    again = stub.Score(
        verifier_pb2.ScoreRequest(items=[item("a", "</think>1", "1", pb.ANSWER_KIND_NUMBER)])
    )
    assert again.results[0].reward.correct


def test_concurrent_requests(stub):
    def one(i: int) -> bool:
        req = verifier_pb2.ScoreRequest(
            items=[item(str(i), f"</think><answer>{i}</answer>", str(i), pb.ANSWER_KIND_NUMBER)]
        )
        return stub.Score(req).results[0].reward.correct

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(64)))


def test_oversized_request_is_refused_and_the_service_survives():
    settings = VerifierSettings(
        rpc=RpcServerSettings(port=0, max_message_bytes=64 * 1024, log_requests=False),
        math_workers=1,
    )
    with Verifier(settings) as verifier:
        running = start(settings, verifier)
        try:
            channel = open_channel(RpcClientSettings(target=running.address))
            stub = verifier_pb2_grpc.VerifierServiceStub(channel)
            big = item("big", "x" * 200_000, "1", pb.ANSWER_KIND_NUMBER)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(verifier_pb2.ScoreRequest(items=[big]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            small = item("small", "</think>1", "1", pb.ANSWER_KIND_NUMBER)
            assert stub.Score(verifier_pb2.ScoreRequest(items=[small])).results[0].reward.correct
            channel.close()
        finally:
            running.stop(grace=1)
