"""Supervision of a local run's processes (axpo.local.processes.Supervisor, RestartSpec) with
real child processes (a shell script standing in for ``axpo serve``, so each start takes
milliseconds), and the rollout worker's prompt stop against a real Redis: it gives up a group
waiting on backpressure or a question cancelled by the stop, and leaves its prompt
unacknowledged for the restarted worker. The whole loop under ``axpo run``, with real services
killed mid-run: tests/e2e/test_supervision.py."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from axpo.contracts import domain as d
from axpo.local.processes import Processes, Restart, RunError, Supervisor, describe_exit
from axpo.queue import PromptTask, TrajectoryQueue
from axpo.settings.job import JobSpec, JobSpecError, RestartSpec, TaskSpec, load_job_spec
from axpo.settings.queue import QueueSettings
from axpo.study.tasks import task_data
from axpo_rollout.worker import RolloutWorker
from tests.integration import redis_fixtures
from tests.integration.redis_fixtures import make_group, new_job_id, pid_alive

# The worker's tests use a real private redis-server (redis_fixtures.py).
redis_server = redis_fixtures.redis_server
redis_client = redis_fixtures.redis_client

# -------------------------------------------------------------------------- RestartSpec


def test_backoff_doubles_per_restart_up_to_its_cap() -> None:
    spec = RestartSpec(max=5, backoff_s=0.5, max_backoff_s=3)
    assert [spec.delay_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert RestartSpec(backoff_s=1, max_backoff_s=30).delay_s(10_000) == 30.0
    with pytest.raises(ValueError, match="start at 1"):
        spec.delay_s(0)


def test_restart_settings_are_read_from_the_job_and_checked(tmp_path: Path) -> None:
    raw = {"name": "j", "model": "m", "run": {"restarts": {"max": 1, "backoff_s": 2}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_job_spec(path).run.restarts == RestartSpec(max=1, backoff_s=2, max_backoff_s=30)
    assert JobSpec(name="j", model="m").run.restarts.max == 3  # on by default
    raw["run"] = {"restarts": {"backoff_s": 5, "max_backoff_s": 1, "max": -1}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(JobSpecError) as err:
        load_job_spec(path)
    assert "run.restarts.max" in str(err.value)
    raw["run"] = {"restarts": {"backoff_s": 5, "max_backoff_s": 1}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(JobSpecError, match=r"max_backoff_s \(1.0\) must be at least backoff_s"):
        load_job_spec(path)


# -------------------------------------------------------------------------- Supervisor

# Stands in for `python -m axpo serve <service> --port N ...`: prints its arguments, then does
# what FAKE says (exits 3, leaves a process behind in its group and exits, or runs).
FAKE_SERVICE = """#!/bin/sh
echo "argv: $*"
case "$FAKE" in
  exit3) echo "boom from $$"; exit 3 ;;
  leftover) sleep 300 & echo $! > "$LEFTOVER"; exit 3 ;;
  deaf) trap '' TERM; exec sleep 300 ;;
  *) exec sleep 300 ;;
esac
"""


@pytest.fixture
def procs(tmp_path: Path) -> Any:
    script = tmp_path / "fake-python"
    script.write_text(FAKE_SERVICE)
    script.chmod(0o755)
    procs = Processes(tmp_path / "run", python=str(script), out=open(os.devnull, "w"))  # noqa: SIM115
    yield procs
    procs.stop_all()
    procs.out.close()


def _supervisor(procs: Processes, **policy: float) -> tuple[Supervisor, list[float], list[Restart]]:
    now = [0.0]
    events: list[Restart] = []
    sup = Supervisor(
        procs,
        RestartSpec(**policy),  # type: ignore[arg-type]
        frozenset({"rollout-0", "tools"}),
        on_restart=events.append,
        clock=lambda: now[0],
    )
    return sup, now, events


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_crashing_process_is_restarted_with_backoff_until_the_budget_is_spent(
    procs: Processes,
) -> None:
    sup, now, events = _supervisor(procs, max=2, backoff_s=1.0, max_backoff_s=1.5)
    child = procs.start("rollout-0", "rollout", {"FAKE": "exit3"})
    child.port = 4321  # as wait_ready would have read it: a restart keeps it
    first = child.proc
    first.wait(10)
    [event] = sup.check()
    assert event == events[0]
    assert (event.service, event.exit_code, event.number, event.delay_s) == ("rollout-0", 3, 1, 1.0)
    assert f"boom from {first.pid}" in event.log_tail
    assert sup.restarts["rollout-0"] == 1
    assert sup.pending() == ["rollout-0"]
    now[0] = 0.9
    assert sup.check() == []
    assert child.proc is first  # still backing off
    now[0] = 1.0
    assert sup.check() == []
    second = child.proc
    assert second is not first
    pids = json.loads((procs.run_dir / "pids.json").read_text())
    assert pids == {"rollout-0": second.pid, "rollout-0~1": first.pid}
    second.wait(10)
    [event] = sup.check()
    assert (event.number, event.delay_s) == (2, 1.5)  # 2.0 capped at max_backoff_s
    now[0] = 2.4
    sup.check()
    assert child.proc is second
    now[0] = 2.5
    sup.check()
    third = child.proc
    assert third is not second
    third.wait(10)
    log = child.log_path.read_text()
    assert log.count("restarting rollout-0") == 2
    assert log.count("--port 4321") == 2  # both restarts on the first one's port
    with pytest.raises(RunError) as err:
        sup.check()
    message = str(err.value)
    assert "rollout-0 exited with code 3 after 2 restart(s)" in message
    assert "run.restarts.max 2" in message
    assert f"boom from {third.pid}" in message  # the log tail
    assert len(events) == 2


def test_a_process_that_ran_long_enough_gets_its_budget_back(procs: Processes) -> None:
    # A standing deployment (axpo deploy): the budget stops a crash loop, not a long life.
    sup, now, _ = _supervisor(procs, max=1, backoff_s=1.0, reset_after_s=100.0)
    child = procs.start("rollout-0", "rollout", {"FAKE": "exit3"})
    child.proc.wait(10)
    [first] = sup.check()  # t=0
    assert first.number == 1
    now[0] = 1.0
    sup.check()  # restarted at t=1
    child.proc.wait(10)
    now[0] = 101.0  # it ran 100 s since its restart
    [again] = sup.check()
    assert (again.number, again.delay_s) == (1, 1.0), "counted from 0 again"
    now[0] = 102.0
    sup.check()  # restarted at t=102
    child.proc.wait(10)
    now[0] = 110.0  # a quick crash: the budget of 1 is spent
    with pytest.raises(RunError, match="after 1 restart"):
        sup.check()


def test_only_restartable_processes_are_restarted(procs: Processes) -> None:
    sup, _now, events = _supervisor(procs, max=3, backoff_s=0.0, max_backoff_s=0.0)
    running = procs.start("tools", "tools", {"FAKE": "run"})
    learner = procs.start("learner", "learner", {"FAKE": "exit3"})
    learner.proc.wait(10)
    assert sup.check(skip=[learner]) == []  # the caller watches the learner itself
    inference = procs.start("inference", "inference", {"FAKE": "run"})
    inference.proc.send_signal(signal.SIGKILL)
    inference.proc.wait(10)
    with pytest.raises(RunError, match="inference exited with signal SIGKILL; last lines"):
        sup.check(skip=[learner])
    assert events == []
    assert running.proc.poll() is None


def test_a_restart_kills_what_the_old_process_left_in_its_group(
    procs: Processes, tmp_path: Path
) -> None:
    sup, _now, _events = _supervisor(procs, max=1, backoff_s=0.0, max_backoff_s=0.0)
    leftover_file = tmp_path / "leftover"
    child = procs.start("tools", "tools", {"FAKE": "leftover", "LEFTOVER": str(leftover_file)})
    child.proc.wait(10)
    _wait(lambda: leftover_file.exists() and leftover_file.read_text().strip() != "")
    leftover = int(leftover_file.read_text())
    assert pid_alive(leftover)
    sup.check()  # schedules (no backoff)
    sup.check()  # restarts
    _wait(lambda: not _running(leftover))


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_stop_times_each_process_and_kills_one_that_ignores_sigterm(procs: Processes) -> None:
    procs.grace_s = 1.0
    polite = procs.start("verifier", "verifier", {"FAKE": "run"})
    deaf = procs.start("tools", "tools", {"FAKE": "deaf"})
    time.sleep(0.2)  # the trap is set
    procs.stop([deaf, polite])
    assert polite.proc.returncode == -signal.SIGTERM
    assert deaf.proc.returncode == -signal.SIGKILL
    assert (polite.stop_s or 9.0) < 0.5  # timed on its own, not behind the deaf one
    assert (deaf.stop_s or 0.0) >= 1.0
    procs.stop([polite])  # already stopped: its time stays
    assert polite.stop_s < 0.5


def test_describe_exit() -> None:
    assert describe_exit(0) == "code 0"
    assert describe_exit(-15) == "signal SIGTERM"
    assert describe_exit(-200) == "signal 200"


# -------------------------------------------------------------------------- the worker's stop


class _Loop:
    """Stands in for AgentLoop (the services' edge); the worker and the queue are real.
    ``behaviour`` runs in place of sampling."""

    def __init__(self, spec: JobSpec, behaviour: Callable[[str], d.Group]) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.sampled: list[str] = []

    def run_group(self, question: Any, *, group_id: str, on_resampling: Any) -> d.Group:
        self.sampled.append(group_id)
        return self.behaviour(group_id)


def _worker_setup(redis_client: Any, max_backlog: int) -> tuple[JobSpec, TrajectoryQueue, str]:
    job = new_job_id()
    spec = JobSpec(name=job, model="m", rollout={"inflight_questions": 1})  # type: ignore[arg-type]
    queue = TrajectoryQueue(redis_client, job, QueueSettings(block_ms=20, max_backlog=max_backlog))
    [entry] = queue.put_prompts([PromptTask("q0", "q0", data=task_data(TaskSpec(), 0))])
    return spec, queue, entry


def _run(worker: RolloutWorker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def _pending(queue: TrajectoryQueue, consumer: str) -> list[str]:
    rows = queue.client.xpending_range(
        queue.prompts_key,
        queue.settings.prompts_consumer_group,
        "-",
        "+",
        10,
        consumername=consumer,
    )
    return [r["message_id"].decode() for r in rows]


@pytest.mark.integration
def test_stop_drops_a_group_waiting_on_backpressure_and_the_restart_samples_it_again(
    redis_client: Any,
) -> None:
    spec, queue, entry = _worker_setup(redis_client, max_backlog=1)
    queue.put_group(make_group("earlier"))  # the learner is gone: the backlog stays full
    produced = threading.Event()

    def sample(group_id: str) -> d.Group:
        produced.set()
        return make_group(group_id)

    worker = RolloutWorker(_Loop(spec, sample), queue, "rollout-0")  # type: ignore[arg-type]
    thread = _run(worker)
    assert produced.wait(10)
    time.sleep(0.3)  # now waiting for room on the groups stream
    stopping = time.monotonic()
    worker.request_stop()
    thread.join(5)
    assert not thread.is_alive(), "the worker did not stop"
    assert time.monotonic() - stopping < 2.0
    assert (worker.counters.abandoned, worker.counters.failures, worker.counters.groups) == (
        1,
        0,
        0,
    )
    assert _pending(queue, "rollout-0") == [entry]  # not acknowledged: redelivered later
    assert queue.dead_letters() == []
    assert queue.backlog() == 1  # nothing put

    # The learner catches up; the worker, restarted under its consumer name, reads it first.
    [earlier] = queue.take_groups("learner-0", count=1, block_ms=0)
    queue.ack_groups([earlier.entry_id])
    restarted = RolloutWorker(
        _Loop(spec, make_group),
        TrajectoryQueue(redis_client, spec.name, queue.settings),
        "rollout-0",
    )  # type: ignore[arg-type]
    thread = _run(restarted)
    _wait(lambda: restarted.counters.groups == 1)
    restarted.request_stop()
    thread.join(5)
    assert _pending(queue, "rollout-0") == []
    [delivery] = queue.take_groups("learner-0", count=1, block_ms=0)
    assert delivery.group.group_id == f"{spec.name}-q0-{entry}"  # same id: the same question


@pytest.mark.integration
def test_a_question_cancelled_by_the_stop_is_neither_a_failure_nor_a_dead_letter(
    redis_client: Any,
) -> None:
    spec, queue, entry = _worker_setup(redis_client, max_backlog=8)
    started = threading.Event()
    release = threading.Event()

    def sample(group_id: str) -> d.Group:
        started.set()
        release.wait(10)
        # What a call on a channel closed by `axpo serve rollout` at the stop raises.
        raise ValueError("Cannot invoke RPC on closed channel!")

    worker = RolloutWorker(_Loop(spec, sample), queue, "rollout-0")  # type: ignore[arg-type]
    thread = _run(worker)
    assert started.wait(10)
    worker.request_stop()
    release.set()
    thread.join(5)
    assert not thread.is_alive()
    assert (worker.counters.abandoned, worker.counters.failures) == (1, 0)
    assert queue.dead_letters() == []
    assert _pending(queue, "rollout-0") == [entry]


@pytest.mark.integration
def test_without_a_stop_the_same_error_is_a_failure(redis_client: Any) -> None:
    """The contrast that keeps the test above honest: ValueError means a bad task."""
    spec, queue, _entry = _worker_setup(redis_client, max_backlog=8)

    def sample(group_id: str) -> d.Group:
        raise ValueError("bad task")

    worker = RolloutWorker(_Loop(spec, sample), queue, "rollout-0")  # type: ignore[arg-type]
    thread = _run(worker)
    _wait(lambda: worker.counters.dead_lettered == 1)
    worker.request_stop()
    thread.join(5)
    assert (worker.counters.abandoned, worker.counters.failures) == (0, 1)
