"""Real ``axpo serve api`` processes over a real Redis: killed (SIGKILL) and restarted while a
client ``wait()`` runs, the client carries on and sees every step; two api processes serve
the same jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from axpo.jobs import JobState, JobStore
from axpo_client import Client
from tests.integration import redis_fixtures
from tests.integration.api_fixtures import TOKEN, free_port, spec
from tests.integration.redis_fixtures import new_job_id

redis_server = redis_fixtures.redis_server

pytestmark = pytest.mark.integration


def start(redis_url: str, prefix: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AXPO_API_REDIS_URL": redis_url,
        "AXPO_API_KEY_PREFIX": prefix,
        "AXPO_API_TOKENS": f"{TOKEN},other",
        "AXPO_API_SSE_PING_S": "0.5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "axpo", "serve", "api", "--port", str(port)],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"api did not start:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_wait_carries_on_across_a_killed_and_restarted_api(redis_server, tmp_path):
    prefix = new_job_id()
    port = free_port()
    log = tmp_path / "api.log"
    proc = start(redis_server.url, prefix, port, log)
    store = JobStore(redis_server.client(), prefix)
    procs = [proc]
    try:
        client = Client(f"http://127.0.0.1:{port}", token=TOKEN)
        job = client.submit(spec(steps=20))
        result: dict[str, object] = {}
        steps_seen: list[int] = []

        def watch() -> None:
            events = []
            try:
                for event in client.events(job.id):
                    events.append(event)
                    if event.type == "step":
                        steps_seen.append(int(event.data["step"]))
                result["events"] = events
                result["job"] = client.wait(job.id, progress=False)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        watcher = threading.Thread(target=watch)
        watcher.start()
        store.mark_running(job.id)
        for s in range(1, 21):
            store.record_step(job.id, {"step": float(s), "policy_version": float(s)})
            if s == 8:
                deadline = time.monotonic() + 10
                while len(steps_seen) < 8 and time.monotonic() < deadline:
                    time.sleep(0.02)
                proc.kill()  # SIGKILL: no goodbye to the watcher
                proc.wait()
            if s == 12:  # steps 9-12 happen while no api runs
                proc = start(redis_server.url, prefix, port, log)
                procs.append(proc)
            time.sleep(0.02)
        store.finish(job.id, JobState.SUCCEEDED)
        watcher.join(timeout=60)
        assert not watcher.is_alive()
        assert "error" not in result, result.get("error")
        assert steps_seen == list(range(1, 21))  # nothing lost, nothing twice
        final = result["job"]
        assert final.state == JobState.SUCCEEDED
        assert final.step == 20
        assert [e.id for e in result["events"]] == [e.id for e in store.events(job.id, count=100)]
    finally:
        for p in procs:
            stop(p)


def test_two_api_processes_serve_the_same_jobs(redis_server, tmp_path):
    prefix = new_job_id()
    a_port, b_port = free_port(), free_port()
    a = start(redis_server.url, prefix, a_port, tmp_path / "a.log")
    b = start(redis_server.url, prefix, b_port, tmp_path / "b.log")
    try:
        ca = Client(f"http://127.0.0.1:{a_port}", token=TOKEN)
        cb = Client(f"http://127.0.0.1:{b_port}", token=TOKEN)
        submitted = [ca.submit(spec(name="a")).id, cb.submit(spec(name="b")).id]
        assert [j.id for j in ca.list().items] == submitted[::-1]
        assert [j.id for j in cb.list().items] == submitted[::-1]
        cb.cancel(submitted[0])  # cancelled through b, seen through a
        assert ca.get(submitted[0]).state == JobState.CANCELLED
        # Same key, either replica: one job.
        key = "same-key"
        assert (
            ca.submit(spec(name="c"), idempotency_key=key).id
            == cb.submit(spec(name="c"), idempotency_key=key).id
        )
    finally:
        stop(a)
        stop(b)
    # A clean stop on SIGTERM: uvicorn shuts down, then re-raises the signal (exit -15).
    assert a.returncode in (0, -signal.SIGTERM)
    assert b.returncode in (0, -signal.SIGTERM)
