"""``axpo bench api``: ``status_p50_ms`` (GET /v1/jobs/{id}) and ``events_p50_ms`` (a step
record written to the job store -> its SSE event received) with 50 concurrent watchers, on a
private Redis and the real application under uvicorn in this process (port 0)."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import tempfile
import threading
import time
from typing import Any

import httpx
import uvicorn

from axpo.jobs import JobStore
from axpo.queue.redis_server import RedisServer
from axpo.settings.api import ApiSettings
from axpo.settings.job import JobSpec
from axpo_api.app import create_app

TOKEN = "bench"


def run(watchers: int = 50, status_calls: int = 300, steps: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(tmp, fsync="everysec")
        server.start()
        try:
            return _measure(server, watchers, status_calls, steps)
        finally:
            server.stop()


def _measure(server: RedisServer, watchers: int, status_calls: int, steps: int) -> dict[str, Any]:
    settings = ApiSettings(
        redis_url=server.url, tokens=(TOKEN,), rate_limit_per_s=1e6, rate_limit_burst=10**6
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    store = JobStore(server.client())
    job, _ = store.submit(JobSpec(name="bench", model="m", steps=steps))
    store.mark_running(job.id)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=url, headers=headers) as http:
            for _ in range(20):  # warm-up
                http.get(f"/v1/jobs/{job.id}")
            status_ms = []
            for _ in range(status_calls):
                t0 = time.perf_counter()
                http.get(f"/v1/jobs/{job.id}").raise_for_status()
                status_ms.append((time.perf_counter() - t0) * 1000)
        latencies = asyncio.run(_watch(url, headers, store, job.id, watchers, steps))
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
    return {
        "status_p50_ms": round(statistics.median(status_ms), 3),
        "status_p95_ms": round(sorted(status_ms)[int(0.95 * len(status_ms))], 3),
        "events_p50_ms": round(statistics.median(latencies), 3),
        "events_p95_ms": round(sorted(latencies)[int(0.95 * len(latencies))], 3),
        "watchers": watchers,
        "events_measured": len(latencies),
    }


async def _watch(
    url: str, headers: dict[str, str], store: JobStore, job_id: str, watchers: int, steps: int
) -> list[float]:
    written: dict[int, float] = {}
    received: list[float] = []
    ready = asyncio.Event()
    connected = 0
    limits = httpx.Limits(max_connections=watchers + 10)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:

        async def watcher() -> None:
            nonlocal connected
            async with http.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
                connected += 1
                if connected == watchers:
                    ready.set()
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and '"step"' in line:
                        step = int(json.loads(line[6:])["step"])
                        received.append((time.perf_counter() - written[step]) * 1000)
                        if step == steps:
                            return

        tasks = [asyncio.create_task(watcher()) for _ in range(watchers)]
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(0.5)  # every watcher past the history, waiting live
        for s in range(1, steps + 1):
            written[s] = time.perf_counter()
            await asyncio.to_thread(
                store.record_step, job_id, {"step": float(s), "policy_version": float(s)}
            )
            await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return received


def print_table(result: dict[str, Any]) -> None:
    for key, value in result.items():
        print(f"{key:>18}  {value}")
