"""`axpo run` keeps going when its processes die: a 3-step job on the tiny model (every service a
real local process) while the test stops and kills them.

In order: SIGTERM to the rollout worker while it samples (it must exit 0 within 5 s, leaving
its questions unacknowledged, none dead-lettered); kill -9 of the tool server (restarted on its
port, healthy again); kill -9 of the restarted rollout worker mid-question. The run must succeed
with the restarts counted (summary, restarts.jsonl); every group the learner trained must have
been trained once, recounted from the run's Redis append-only file (each group put, each group
the learner acknowledged as consumed) against the learner's metrics; the killed worker's
questions must come back; and at the end every process must stop within seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from axpo.rpc.client import open_channel, wait_for_health
from axpo.settings.base import RpcClientSettings
from axpo.v1 import common_pb2 as pb
from tests.e2e.test_run import _alive_in_run

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
QUESTIONS = 2


def _job(tmp_path: Path) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "tiny-cpu-axpo.yaml").read_text())
    spec.update(name="e2e-supervision", steps=STEPS, questions_per_step=QUESTIONS)
    spec["model"] = str(tmp_path / "model")
    spec["algorithm"]["name"] = "grpo"
    spec["algorithm"]["group_size"] = 2
    spec["rollout"]["max_new_tokens"] = 32
    spec["run"]["prepare_model"] = "tiny"  # random init: seconds to build
    spec["run"]["restarts"] = {"max": 2, "backoff_s": 0.5, "max_backoff_s": 2}
    spec.pop("eval")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class _Lines:
    """The launcher's stderr, read on a thread (so its pipe never fills)."""

    def __init__(self, stream: Any) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._lock:
                self.text += line

    def wait_for(self, needle: str, proc: subprocess.Popen[str], timeout: float) -> None:
        _wait(lambda: needle in self.text, timeout, lambda: f"no {needle!r}:\n{self.text}", proc)


def _wait(
    cond: Callable[[], bool],
    timeout: float,
    what: Callable[[], str],
    proc: subprocess.Popen[str] | None = None,
    every: float = 0.05,
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"axpo run ended early; {what()}"
        assert time.monotonic() < deadline, what()
        time.sleep(every)


def _gone(pid: int) -> bool:
    """Exited: no process, or a zombie its parent (the launcher) has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _pids(run_dir: Path) -> dict[str, int]:
    return dict(json.loads((run_dir / "pids.json").read_text()))


def _pending(client: redis.Redis, key: str, consumer: str) -> set[str]:
    rows = client.xpending_range(key, "rollout", "-", "+", 100, consumername=consumer)
    return {r["message_id"].decode() for r in rows}


def _aof_commands(path: Path) -> list[list[bytes]]:
    """The commands of a Redis append-only file (RESP arrays of bulk strings)."""
    buf = path.read_bytes()
    out, i = [], 0
    while i < len(buf):
        assert buf[i : i + 1] == b"*", f"{path}: not a plain AOF at byte {i}"
        j = buf.index(b"\r\n", i)
        n, i = int(buf[i + 1 : j]), j + 2
        cmd = []
        for _ in range(n):
            j = buf.index(b"\r\n", i)
            size, i = int(buf[i + 1 : j]), j + 2
            cmd.append(buf[i : i + size])
            i += size + 2
        out.append(cmd)
    return out


def _recount(aof: Path, job: str) -> tuple[dict[str, str], list[str], set[str], int]:
    """From the queue's own log: ``{group entry: group id}`` for every group put, the group
    entries the learner acknowledged as consumed (in order), the prompt entries acknowledged
    as done, and how many entries were dead-lettered."""
    groups_key, prompts_key = f"axpo:{job}:groups".encode(), f"axpo:{job}:prompts".encode()
    put: dict[str, str] = {}
    consumed: list[str] = []
    prompts_done: set[str] = set()
    dead = 0
    block: list[list[bytes]] = []
    for cmd in _aof_commands(aof):
        name = cmd[0].upper()
        if name == b"XADD" and cmd[1] == groups_key:
            fields = dict(zip(cmd[3::2], cmd[4::2], strict=True))
            put[cmd[2].decode()] = pb.Group.FromString(fields[b"group"]).group_id
        elif name == b"XADD" and cmd[1] == f"axpo:{job}:dead".encode():
            dead += 1
        elif name == b"MULTI":
            block = []
        elif name == b"EXEC":
            # The queue's release script: XACKs, then one HINCRBY of the counter it releases as.
            counters = {c[2] for c in block if c[0].upper() == b"HINCRBY"}
            acked = [c for c in block if c[0].upper() == b"XACK"]
            for c in acked:
                if c[1] == groups_key and b"consumed" in counters:
                    consumed.append(c[3].decode())
                if c[1] == prompts_key and b"prompts_done" in counters:
                    prompts_done.add(c[3].decode())
        else:
            block.append(cmd)
    return put, consumed, prompts_done, dead


def test_killed_services_are_restarted_and_every_group_is_trained_once(tmp_path: Path) -> None:
    config = _job(tmp_path)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "axpo", "run", str(config), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        [*cmd, "--no-progress"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = _Lines(proc.stderr)
    try:
        err.wait_for(f"training {STEPS} steps", proc, 400)
        port = next(
            int(line.split()[1])
            for line in (run_dir / "redis" / "redis.conf").read_text().splitlines()
            if line.startswith("port ")
        )
        client = redis.Redis(port=port)
        prompts_key = b"axpo:e2e-supervision:prompts"

        # 1. SIGTERM while it samples: out within 5 s, exit code 0, its questions left pending.
        _wait(lambda: _pending(client, prompts_key, "rollout-0") != set(), 60, lambda: "no work")
        first = _pids(run_dir)["rollout-0"]
        stopping = time.monotonic()
        os.kill(first, signal.SIGTERM)
        _wait(lambda: _gone(first), 5.0, lambda: "the rollout worker ignored SIGTERM for 5 s")
        stop_s = time.monotonic() - stopping
        left_at_stop = _pending(client, prompts_key, "rollout-0")
        # Given up at once, not sampled to the end (what kept a worker for 20 s at a run's end).
        assert left_at_stop, "the stopped worker finished its questions instead of leaving them"
        assert client.xlen(b"axpo:e2e-supervision:dead") == 0
        err.wait_for("rollout-0 exited with code 0; restarting it in 0.5 s", proc, 10)

        # 2. kill -9 of the tool server: restarted on the same port and healthy again.
        tools = _pids(run_dir)["tools"]
        os.kill(tools, signal.SIGKILL)
        err.wait_for("tools exited with signal SIGKILL; restarting it", proc, 10)
        _wait(lambda: _pids(run_dir)["tools"] != tools, 10, lambda: "tools not restarted")
        tools_port = int((run_dir / "ports" / "tools").read_text())
        channel = open_channel(RpcClientSettings(target=f"127.0.0.1:{tools_port}"))
        try:
            wait_for_health(channel, 60)
        finally:
            channel.close()

        # 3. kill -9 of the restarted worker once it is at work again.
        _wait(lambda: _pids(run_dir)["rollout-0"] != first, 10, lambda: err.text)
        log = run_dir / "logs" / "rollout-0.log"
        _wait(lambda: log.read_text().count("worker started") == 2, 120, log.read_text, proc)
        time.sleep(0.5)
        second = _pids(run_dir)["rollout-0"]
        left_at_kill = _pending(client, prompts_key, "rollout-0")
        os.kill(second, signal.SIGKILL)
        err.wait_for("rollout-0 exited with signal SIGKILL; restarting it in 1 s", proc, 10)

        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
    assert proc.returncode == 0, err.text[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == STEPS
    assert summary["restarts"] == {"rollout-0": 2, "tools": 1, "verifier": 0}
    restarts = [json.loads(x) for x in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert [(r["service"], r["exit_code"], r["number"]) for r in restarts] == [
        ("rollout-0", 0, 1),
        ("tools", -9, 1),
        ("rollout-0", -9, 2),
    ]

    # Every group trained once: the learner's records against the queue's log.
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1.0, 2.0, 3.0]
    put, consumed, prompts_done, dead = _recount(
        run_dir / "redis" / "appendonly.aof", "e2e-supervision"
    )
    assert dead == 0
    assert len(consumed) == sum(r["groups"] for r in records) == STEPS * QUESTIONS
    trained = Counter(put[entry] for entry in consumed)
    assert set(trained.values()) == {1}, f"trained more than once: {trained}"

    # The stopped and the killed worker's questions were not lost: the restarted worker read
    # them again first (a group carries its prompt's entry id), or they are still pending.
    # Whether the restarted worker got to them before the run's last step depends on timing
    # (it did in 2 of 4 runs on the 2-core VM), so redelivery itself is asserted where it is
    # deterministic: tests/unit/test_supervision.py
    # (test_stop_drops_a_group_waiting_on_backpressure_and_the_restart_samples_it_again).
    assert left_at_stop
    for entry in left_at_stop | left_at_kill:
        sampled = any(gid.endswith(f"-{entry}") for gid in put.values())
        assert sampled or entry not in prompts_done, entry

    # Prompt shutdown, mid-run and at the end (the inference service, whose vLLM engine takes
    # some 5-8 s to tear down here, within the grace period: no "did not stop").
    assert stop_s < 5.0
    stops = summary["stop_s"]
    assert max(stops[name] for name in ("rollout-0", "tools", "verifier")) < 5.0, stops
    assert "did not stop" not in err.text
    assert _alive_in_run(run_dir) == []
