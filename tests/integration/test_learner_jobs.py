"""A deployment's learner watching its job (``axpo_learner.jobs.JobRunner._watch``) against a
real Redis: the questions are fed, a cancel stops the loop, and so does the job ending
elsewhere (a rollout worker that cannot sample it fails it) — before, the learner waited
forever for groups no worker would make, and every later job stayed queued."""

from __future__ import annotations

import threading

import pytest

from axpo.jobs import JobState, JobStore
from axpo.jobs.feeder import PromptFeeder
from axpo.queue import TrajectoryQueue
from axpo.settings.job import JobSpec
from axpo.settings.learner import LearnerSettings
from axpo.settings.queue import QueueSettings
from axpo_learner.jobs import JobRunner
from tests.integration import redis_fixtures
from tests.integration.redis_fixtures import new_job_id

redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client

pytestmark = pytest.mark.integration


class _Loop:
    """What the watcher uses of a LearnerLoop."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    def done(self) -> bool:
        return False

    def request_stop(self) -> None:
        self.stop.set()


def _watching(redis_client, tmp_path):
    prefix = new_job_id()
    settings = LearnerSettings(
        job_store=True,
        jobs_dir=str(tmp_path),
        job_poll_s=0.05,
        queue=QueueSettings(key_prefix=prefix),
    )
    runner = JobRunner(settings, redis_client, publisher=None)
    store = JobStore(redis_client, prefix)
    spec = JobSpec(name="watched", model="m", questions_per_step=2)
    job, _ = store.submit(spec)
    store.claim_next()
    store.mark_running(job.id)
    queue = TrajectoryQueue(redis_client, job.id, settings.queue)
    queue.ensure()
    loop = _Loop()
    cancelled, ended = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=runner._watch,
        args=(job.id, PromptFeeder(queue, spec), loop, cancelled, ended),
        daemon=True,
    )
    thread.start()
    return store, job, queue, loop, cancelled, ended, thread


def test_the_watcher_feeds_the_questions_and_stops_the_loop_on_a_cancel(redis_client, tmp_path):
    store, job, queue, loop, cancelled, ended, thread = _watching(redis_client, tmp_path)
    assert not loop.stop.wait(0.3)
    assert queue.counters().prompts_produced == 4  # two steps' worth, kept up
    store.cancel(job.id)
    thread.join(5)
    assert loop.stop.is_set()
    assert cancelled.is_set()
    assert not ended.is_set()


def test_the_watcher_stops_the_loop_when_the_job_ended_elsewhere(redis_client, tmp_path):
    store, job, _, loop, cancelled, ended, thread = _watching(redis_client, tmp_path)
    store.finish(job.id, JobState.FAILED, "rollout worker: unknown tool 'nope'")
    thread.join(5)
    assert loop.stop.is_set(), "the learner would wait for groups forever"
    assert ended.is_set()
    assert not cancelled.is_set()
