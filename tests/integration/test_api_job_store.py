"""The job store (axpo.jobs) against a real Redis: lifecycle and allowed transitions, one
running job per deployment, idempotency, events resumable by id, metrics paging, cancel."""

from __future__ import annotations

import threading

import pytest

from axpo.jobs import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobState,
    JobStateError,
    JobStore,
)
from axpo.settings.job import JobSpec
from tests.integration import redis_fixtures
from tests.integration.redis_fixtures import new_job_id

redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client, key_prefix=new_job_id(), idempotency_ttl_s=60)


def spec(name: str = "tiny", steps: int = 3) -> JobSpec:
    return JobSpec(name=name, model="m", steps=steps)


def step_record(step: int, **extra: float) -> dict[str, float]:
    return {"step": float(step), "policy_version": float(step), "reward_mean": 0.5, **extra}


def test_a_job_goes_through_its_life(store):
    job, created = store.submit(spec())
    assert created
    assert job.state == JobState.QUEUED
    assert job.steps == 3
    assert job.started_at is None
    assert job.id.startswith("tiny-")
    assert ":" not in job.id
    claimed = store.claim_next()
    assert claimed is not None
    assert claimed.id == job.id
    running = store.mark_running(job.id)
    assert running.state == JobState.RUNNING
    assert running.started_at is not None
    store.record_step(job.id, step_record(1, loss=float("nan")))
    store.record_checkpoint(job.id, 1, "/ckpt/1")
    store.record_publish(job.id, version=1, step=1)
    store.record_restart(job.id, "rollout-0", "exit code -9", restarts=1)
    done = store.finish(job.id, JobState.SUCCEEDED)
    assert done.state == JobState.SUCCEEDED
    assert done.ended_at is not None
    assert done.step == 1
    assert done.policy_version == 1
    assert done.last_step is not None
    assert done.last_step["loss"] is None
    kinds = [e.type for e in store.events(job.id)]
    assert kinds == ["state", "state", "step", "checkpoint", "publish", "restart", "state"]
    assert [e.data["state"] for e in store.events(job.id) if e.type == "state"] == [
        "queued",
        "running",
        "succeeded",
    ]
    assert store.checkpoints(job.id)[0]["path"] == "/ckpt/1"


def test_transitions_not_allowed_are_refused(store):
    job, _ = store.submit(spec())
    with pytest.raises(JobStateError, match="only from running"):
        store.finish(job.id, JobState.SUCCEEDED)  # queued -> succeeded
    with pytest.raises(JobStateError, match="only while running"):
        store.record_step(job.id, step_record(1))
    store.mark_running(job.id)
    store.finish(job.id, JobState.FAILED, error="learner died 3 times")
    with pytest.raises(JobStateError, match="already failed"):
        store.cancel(job.id)
    with pytest.raises(JobStateError):
        store.mark_running(job.id)
    assert store.get(job.id).error == "learner died 3 times"
    with pytest.raises(ValueError, match="needs an error"):
        store.finish(job.id, JobState.FAILED)
    with pytest.raises(JobNotFoundError):
        store.get("nope")
    with pytest.raises(JobNotFoundError):
        store.record_checkpoint("nope", 1, "/x")


def test_one_running_job_per_deployment_in_fifo_order(store):
    first, _ = store.submit(spec("a"))
    second, _ = store.submit(spec("b"))
    third, _ = store.submit(spec("c"))
    store.cancel(second.id)  # a queued job is cancelled at once and never claimed
    assert store.get(second.id).state == JobState.CANCELLED
    assert store.claim_next().id == first.id
    assert store.claim_next().id == first.id  # a restarted learner gets the same job back
    store.mark_running(first.id)
    assert store.claim_next().id == first.id
    store.finish(first.id, JobState.SUCCEEDED)
    assert store.claim_next().id == third.id
    store.finish(third.id, JobState.FAILED, error="x")
    assert store.claim_next() is None


def test_concurrent_claims_take_each_job_once(store):
    ids = [store.submit(spec(f"j{i}"))[0].id for i in range(20)]
    claimed: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            job = store.claim_next()
            if job is None:
                return
            with lock:
                if job.id in claimed:  # the slot still holds it: another thread finishes it
                    continue
                claimed.append(job.id)
            store.mark_running(job.id)
            store.finish(job.id, JobState.SUCCEEDED)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    assert claimed == ids  # FIFO


def test_idempotency_key_returns_the_same_job(store):
    a, created_a = store.submit(spec(), idempotency_key="k1", scope="alice")
    b, created_b = store.submit(spec(), idempotency_key="k1", scope="alice")
    assert created_a
    assert not created_b
    assert a.id == b.id
    c, created_c = store.submit(spec(), idempotency_key="k1", scope="bob")  # another caller
    assert created_c
    assert c.id != a.id
    with pytest.raises(IdempotencyConflictError, match="different spec"):
        store.submit(spec(steps=9), idempotency_key="k1", scope="alice")
    jobs, _ = store.list()
    assert len(jobs) == 2


def test_list_filters_by_state_and_pages_newest_first(store):
    ids = [store.submit(spec(f"j{i}"))[0].id for i in range(7)]
    store.cancel(ids[1])
    page, cursor = store.list(limit=3)
    assert [j.id for j in page] == ids[::-1][:3]
    assert cursor is not None
    seen = [j.id for j in page]
    while cursor is not None:
        page, cursor = store.list(limit=3, cursor=cursor)
        seen += [j.id for j in page]
    assert seen == ids[::-1]
    queued, _ = store.list(JobState.QUEUED)
    assert [j.id for j in queued] == [i for i in ids[::-1] if i != ids[1]]
    assert [j.id for j in store.list(JobState.CANCELLED)[0]] == [ids[1]]
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=0)


def test_events_resume_after_an_id_with_no_gap(store):
    job, _ = store.submit(spec(steps=50))
    store.mark_running(job.id)
    for s in range(1, 31):
        store.record_step(job.id, step_record(s))
    everything = store.events(job.id, count=1000)
    resumed = []
    after = "0"
    while True:
        batch = store.events(job.id, after=after, count=7)
        if not batch:
            break
        resumed += batch
        after = batch[-1].id
    assert [e.id for e in resumed] == [e.id for e in everything]
    assert len(everything) == 32


def test_metrics_are_paged_by_step_and_a_repeated_step_is_replaced(store):
    job, _ = store.submit(spec(steps=10))
    store.mark_running(job.id)
    for s in range(1, 6):
        store.record_step(job.id, step_record(s))
    store.record_step(job.id, step_record(5, reward_mean=0.9))  # resumed learner, step 5 again
    assert [r["step"] for r in store.metrics(job.id)] == [1, 2, 3, 4, 5]
    assert store.metrics(job.id, after_step=4)[0]["reward_mean"] == 0.9
    assert [r["step"] for r in store.metrics(job.id, after_step=1, limit=2)] == [2, 3]
    with pytest.raises(ValueError, match="'step'"):
        store.record_step(job.id, {"loss": 1.0})


def test_cancel_of_a_running_job_sets_the_flag_workers_poll(store):
    job, _ = store.submit(spec())
    store.mark_running(job.id)
    assert not store.cancel_requested(job.id)
    after = store.cancel(job.id)
    assert after.state == JobState.RUNNING
    assert after.cancel_requested
    assert store.cancel_requested(job.id)
    store.cancel(job.id)  # twice is harmless
    assert [e.type for e in store.events(job.id)].count("cancel_requested") == 1
    store.finish(job.id, JobState.CANCELLED)
    with pytest.raises(JobStateError, match="already cancelled"):
        store.cancel(job.id)


def test_the_runtime_of_a_job_is_its_first_starts_and_running_job_follows_the_slot(store):
    job, _ = store.submit(spec())
    assert store.runtime(job.id) is None
    assert store.running_job() is None
    assert store.claim_next().id == job.id
    assert store.running_job() is None, "claimed but not started: workers wait"
    store.mark_running(job.id)
    assert store.running_job().id == job.id
    first = store.start_runtime(job.id, {"base_version": 5, "max_backlog": 8})
    assert first == {"base_version": 5, "max_backlog": 8}
    # A restarted learner starts the job again: the first decision stands.
    assert store.start_runtime(job.id, {"base_version": 9, "max_backlog": 8}) == first
    assert store.runtime(job.id) == first
    assert store.get(job.id).state == JobState.RUNNING  # the record reads as before
    store.finish(job.id, JobState.SUCCEEDED)
    assert store.running_job() is None
    with pytest.raises(JobNotFoundError):
        store.start_runtime("no-such-job", {"base_version": 0})
    assert not store.client.exists(store.job_key("no-such-job"))
