"""``axpo bench verifier``: throughput of the verifier through its real gRPC service.

The service runs as a separate process (``axpo serve verifier``) pinned to one CPU core, as
the issue's floor is stated per core; the client runs in this process. Non-math items (a mix
of choice, number and text outputs written like real model outputs) and math items are timed
separately, then a mixed batch. Each figure is the best of ``rounds`` rounds.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from axpo.contracts import convert
from axpo.contracts.domain import AnswerKind, ScoreItem
from axpo.rpc.client import open_channel, wait_for_health
from axpo.settings.base import RpcClientSettings
from axpo.v1 import verifier_pb2, verifier_pb2_grpc

BATCH = 256  # items per Score request; a rollout group is 8-16, a step's worth is hundreds
IN_FLIGHT = 2  # concurrent requests, so the server never waits on the client


def _think(rng: random.Random) -> str:
    return (
        "<think>\n"
        + " ".join(
            rng.choice(["look", "at", "the", "chart", "so"]) for _ in range(rng.randint(20, 120))
        )
        + "\n</think>\n\n"
    )


def non_math_items(n: int, seed: int = 0) -> list[ScoreItem]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = (AnswerKind.CHOICE, AnswerKind.NUMBER, AnswerKind.TEXT)[i % 3]
        if kind is AnswerKind.CHOICE:
            gold = rng.choice("ABCD")
            out = _think(rng) + rng.choice(
                [
                    f"The answer is ({rng.choice('ABCD')}).",
                    f"<answer>{gold}</answer>",
                    f"Option {gold}",
                    f"\\boxed{{{rng.choice('ABCD')}}}",
                ]
            )
            items.append(ScoreItem(out, gold, kind, choices=("red", "green", "blue", "gray")))
        elif kind is AnswerKind.NUMBER:
            value = rng.randint(0, 10_000) / rng.choice([1, 10, 100])
            gold = f"{value:g}"
            out = _think(rng) + rng.choice(
                [
                    f"<answer>{value:,}</answer>",
                    f"The answer is {value * 1.03:.2f}%.",
                    f"There are {int(value)} apples.",
                    f"\\boxed{{{value}}}",
                ]
            )
            items.append(ScoreItem(out, gold, kind))
        else:
            gold = rng.choice(["Paris", "the red car", "Mount Everest", "blue"])
            out = _think(rng) + rng.choice(
                [f"<answer>{gold.upper()}</answer>", f"The answer is {gold}.", "I think it's green"]
            )
            items.append(ScoreItem(out, gold, kind))
    return items


def math_items(n: int, seed: int = 0) -> list[ScoreItem]:
    """Unique expressions (so no cache inside sympy or math-verify can serve a repeat), about
    one in seven wrong."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        answer, gold = [
            (
                f"\\frac{{{a}}}{{{a * b}}}",
                f"{1 / b:.12g}" if b in (2, 4, 5, 8, 10) else f"\\frac{{1}}{{{b}}}",
            ),
            (f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}"),
            (f"\\sqrt{{{a * a}}}", str(a)),
            (f"[{a}, {a + b})", f"[{a},{a + b})"),
            (f"{a}\\pi", f"\\pi \\cdot {a}"),
            (f"\\frac{{{a}}}{{{b}}}", f"{a / b + 0.5:.6f}"),  # wrong
        ][i % 6]
        items.append(ScoreItem(_think(rng) + f"So \\boxed{{{answer}}}", gold, AnswerKind.MATH))
    return items


def _request(items: list[ScoreItem]) -> verifier_pb2.ScoreRequest:
    return verifier_pb2.ScoreRequest(items=[convert.score_item_to_proto(i) for i in items])


def _throughput(
    stub: verifier_pb2_grpc.VerifierServiceStub, items: list[ScoreItem], rounds: int
) -> float:
    requests = [_request(items[i : i + BATCH]) for i in range(0, len(items), BATCH)]
    best = 0.0
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            answers = list(pool.map(lambda r: stub.Score(r, timeout=600), requests))
            elapsed = time.perf_counter() - start
            assert sum(len(a.results) for a in answers) == len(items)
            best = max(best, len(items) / elapsed)
    return best


def run(items: int = 20_000, math_items_n: int = 200, rounds: int = 3) -> dict[str, Any]:
    """Start the service pinned to one core, measure, stop it; return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        cores = sorted(os.sched_getaffinity(0))
        server_core, client_cores = cores[-1], set(cores[:-1]) or {cores[-1]}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "axpo.cli.main",
                "serve",
                "verifier",
                "--port",
                "0",
                "--port-file",
                str(port_file),
            ],
            env={
                **os.environ,
                "AXPO_VERIFIER_RPC__LOG_REQUESTS": "false",
                "AXPO_VERIFIER_LOG__LEVEL": "WARNING",
            },
            preexec_fn=lambda: os.sched_setaffinity(0, {server_core}),
        )
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("verifier service did not start (see its log above)")
                time.sleep(0.05)
            os.sched_setaffinity(0, client_cores)
            target = f"127.0.0.1:{port_file.read_text().strip()}"
            channel = open_channel(RpcClientSettings(target=target, deadline_s=600))
            with channel:
                wait_for_health(channel, timeout_s=30)
                stub = verifier_pb2_grpc.VerifierServiceStub(channel)
                _throughput(stub, non_math_items(512, seed=99), 1)  # warm-up
                _throughput(stub, math_items(16, seed=99), 1)
                plain = _throughput(stub, non_math_items(items), rounds)
                maths = _throughput(stub, math_items(math_items_n), rounds)
                mixed_items = non_math_items(items // 4, seed=1) + math_items(
                    max(1, items // 400), seed=1
                )
                random.Random(2).shuffle(mixed_items)
                mixed = _throughput(stub, mixed_items, rounds)
        finally:
            os.sched_setaffinity(0, set(cores))
            proc.terminate()
            proc.wait(timeout=30)
    return {
        "items_per_s": round(plain, 1),
        "math_items_per_s": round(maths, 1),
        "mixed_items_per_s": round(mixed, 1),
        "mixed_math_share": round(max(1, items // 400) / len(mixed_items), 4),
        "items": items,
        "math_items": math_items_n,
        "batch": BATCH,
        "server_cores": 1,
        "rounds": rounds,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"verifier throughput through gRPC, service pinned to {result['server_cores']} core "
        f"(best of {result['rounds']} rounds, batches of {result['batch']}):"
    )
    print(f"  non-math items/s : {result['items_per_s']:>10,.0f}")
    print(f"  math items/s     : {result['math_items_per_s']:>10,.1f}")
    print(
        f"  mixed items/s    : {result['mixed_items_per_s']:>10,.0f}  "
        f"({result['mixed_math_share']:.1%} math)"
    )
