"""The api for tests: the real application under uvicorn in a thread on port 0, over a real
private redis-server (``redis_fixtures``); each test gets a key prefix of its own, so tests
never see each other's jobs.

Import into a test module as ``redis_fixtures`` is (``api = api_fixtures.api``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from axpo.jobs import JobStore
from axpo.queue.redis_server import RedisServer
from axpo.settings.api import ApiSettings
from axpo_api.app import create_app
from tests.integration.redis_fixtures import new_job_id

TOKEN = "test-token-1"
OTHER_TOKEN = "test-token-2"


@dataclass
class RunningApi:
    url: str
    settings: ApiSettings
    store: JobStore
    server: uvicorn.Server

    def headers(self, token: str = TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_api(server: RedisServer, **overrides: Any) -> tuple[RunningApi, threading.Thread]:
    """The application under uvicorn in a daemon thread; stop with ``api.server.should_exit``."""
    values: dict[str, Any] = {
        "redis_url": server.url,
        "key_prefix": new_job_id(),
        "tokens": (TOKEN, OTHER_TOKEN),
        "sse_ping_s": 0.5,
        **overrides,
    }
    settings = ApiSettings(**values)
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the api did not start")
        time.sleep(0.02)
    store = JobStore(server.client(), settings.key_prefix)
    return RunningApi(f"http://127.0.0.1:{port}", settings, store, uv), thread


@pytest.fixture
def api(redis_server: RedisServer) -> Iterator[RunningApi]:
    running, thread = start_api(redis_server)
    yield running
    running.server.should_exit = True
    thread.join(timeout=10)


SPEC = {"name": "tiny", "model": "some/model", "steps": 3}


def spec(**overrides: Any) -> dict[str, Any]:
    return {**SPEC, **overrides}
