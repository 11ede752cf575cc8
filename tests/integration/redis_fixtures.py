"""Redis fixtures: a real private redis-server per test session (never a mock).

Import the fixtures into a test module (``from tests.integration.redis_fixtures import
redis_server, redis_client``). ``redis_server.restart()`` kills the server with SIGKILL and
starts it again on the same port and directory (AOF, ``appendfsync always``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from axpo.contracts import domain as d
from axpo.queue.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private server for the session; tests use their own job ids (keys never collide)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), fsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis_server(tmp_path) -> Iterator[RedisServer]:
    """A private server of the test's own, for tests that kill it."""
    server = RedisServer(tmp_path / "redis", fsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def new_job_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def make_image(seed: int, size: int = 1024) -> d.Image:
    """Deterministic pseudo-random bytes standing in for an encoded image."""
    blob = b"".join(hashlib.sha256(f"{seed}/{i}".encode()).digest() for i in range(size // 32))
    return d.Image.from_bytes(blob[:size], "image/png")


def make_trajectory(
    tid: str, n_tokens: int, image: d.Image | None, prompt: int = 4
) -> d.Trajectory:
    n_tokens = max(n_tokens, prompt + 1)
    return d.Trajectory(
        trajectory_id=tid,
        token_ids=tuple(range(n_tokens)),
        loss_mask=tuple(i >= prompt for i in range(n_tokens)),
        logprobs=tuple(-0.5 if i >= prompt else 0.0 for i in range(n_tokens)),
        entropies=tuple(0.25 if i >= prompt else 0.0 for i in range(n_tokens)),
        segments=(
            d.Segment(d.SegmentKind.PROMPT, 0, prompt),
            d.Segment(d.SegmentKind.ANSWER, prompt, n_tokens, policy_version=1),
        ),
        prompt_length=prompt,
        image_sha256=(image.sha256,) if image else (),
        reward=d.Reward(1.0, True, 1.0, 0.0, 0.0, "4", "number", "ok"),
    )


def make_group(
    gid: str,
    *,
    image: d.Image | None = None,
    rollouts: int = 4,
    tokens: int = 16,
    version: int = 0,
    job_id: str = "",
) -> d.Group:
    return d.Group(
        group_id=gid,
        question_id=f"q-{gid}",
        trajectories=tuple(make_trajectory(f"{gid}/{i}", tokens, image) for i in range(rollouts)),
        images=(image,) if image else (),
        policy_version=version,
        job_id=job_id,
        created_at=1.5,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
