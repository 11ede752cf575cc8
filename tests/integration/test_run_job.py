"""The job of an ``axpo run`` (axpo.local.run_job) against a real ``axpo serve api`` process
and a real private Redis: the token file, submit and claim, step/checkpoint/publish/restart
records seen through the client, cancel, and a second run in the same folder."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from axpo.jobs import JobState, JobStore
from axpo.local.processes import Processes, Restart
from axpo.local.run_job import RunJob, start_api, submit_and_claim
from axpo.queue.redis_server import RedisServer
from axpo.settings.job import JobSpec
from axpo_client import Client

pytestmark = pytest.mark.integration

SPEC = JobSpec.model_validate({"name": "runjob", "model": "some/model", "steps": 2})


@pytest.fixture
def running(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", fsync="always")
    server.start()
    procs = Processes(tmp_path, grace_s=5)
    try:
        _api, url, token = start_api(procs, server.url, tmp_path, timeout_s=60)
        yield server, procs, url, token
    finally:
        procs.stop_all()
        server.stop()


def test_a_run_job_is_submitted_claimed_recorded_and_read_back(running, tmp_path: Path) -> None:
    server, _procs, url, token = running
    assert (tmp_path / "api-url").read_text().strip() == url
    token_file = tmp_path / "api-token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    store = JobStore(server.client())
    client = Client(url, token)
    job_id = submit_and_claim(client, store, SPEC, tmp_path)
    assert client.get(job_id).state == "running"
    # A second submit of the same run folder is the same job (idempotency key).
    assert submit_and_claim(client, store, SPEC, tmp_path) == job_id

    ckpt = tmp_path / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "checkpoints" / ".tmp-x").mkdir()  # incomplete: not a checkpoint
    versions = iter([1, 1])
    job = RunJob(store, client, job_id, url, tmp_path / "checkpoints", lambda: next(versions))
    records = [{"step": 1.0, "policy_version": 1.0, "loss": 0.5}, {"step": 2.0, "loss": 0.25}]
    for r in records:
        job.record(r)
    job.on_restart(Restart("tools", -9, 1, 0.5, "tail"))
    assert job.finish(JobState.SUCCEEDED) == "succeeded"
    assert job.finish(JobState.FAILED, "ignored: ended already") == "succeeded"

    assert client.metrics(job_id) == records
    events = list(client.events(job_id))
    kinds = [(e.type, e.data.get("state")) for e in events]
    assert kinds == [
        ("state", "queued"),
        ("state", "running"),
        ("step", None),
        ("checkpoint", None),
        ("publish", None),
        ("step", None),
        ("restart", None),
        ("state", "succeeded"),
    ]
    assert events[3].data["path"] == str(ckpt)
    assert events[4].data["version"] == 1
    assert events[6].data["process"] == "tools"
    assert "signal SIGKILL" in events[6].data["reason"]
    assert [c.step for c in client.checkpoints(job_id)] == [1]

    # Run again in the same folder: the finished job is not reused, a new one is claimed.
    again = submit_and_claim(client, store, SPEC, tmp_path)
    assert again != job_id
    assert client.get(again).state == "running"


def test_a_cancel_through_the_api_is_seen_and_ends_cancelled(running, tmp_path: Path) -> None:
    server, _procs, url, token = running
    store = JobStore(server.client())
    client = Client(url, token)
    job_id = submit_and_claim(client, store, SPEC, tmp_path)
    job = RunJob(store, client, job_id, url, tmp_path / "checkpoints")
    assert not job.cancel_requested()
    job.cancel()
    assert job.cancel_requested()
    assert job.finish(JobState.CANCELLED) == "cancelled"
    job.cancel()  # finished: a 409 the job ignores


def test_a_job_left_running_by_an_earlier_attempt_is_superseded(running, tmp_path: Path) -> None:
    server, _procs, url, token = running
    store = JobStore(server.client())
    client = Client(url, token)
    stale, _ = store.submit(SPEC.model_copy(update={"name": "stale"}))
    assert store.claim_next() is not None
    store.mark_running(stale.id)
    job_id = submit_and_claim(client, store, SPEC, tmp_path)
    assert store.get(job_id).state == JobState.RUNNING
    old = client.get(stale.id)
    assert old.state == "failed"
    assert f"superseded by job {job_id}" in (old.error or "")
