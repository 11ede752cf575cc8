"""A deployment (``axpo.local.deployment``: Redis, the api, every service, a learner and a
rollout worker in job-store mode, each a real local process) running jobs submitted through its
api, on the tiny model:

- ``axpo job submit CONFIG --watch`` runs a 2-step job to ``succeeded`` with the files
  ``axpo run`` writes;
- a job cancelled with ``axpo job cancel`` ends ``cancelled`` with a checkpoint, and the
  deployment stays up;
- a learner killed with SIGKILL mid-job is restarted by the supervisor and resumes the job
  from its checkpoint: every step once in the job's records, the restart in its events;
- two jobs submitted together run one after the other, the second from the base weights at
  a version above every one the first published;
- an inference service killed with SIGKILL mid-job is restarted; the learner sees it serve
  its starting weights and publishes the job's again, and the job succeeds (its later steps
  trained on groups sampled after the restart).

One deployment (one vLLM engine) serves the module's tests, in this order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from axpo.local.deployment import Deployment
from axpo.local.processes import RunError, settings_env
from axpo.settings.job import RestartSpec

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _spec(model: Path, name: str, steps: int, **learner: Any) -> dict[str, Any]:
    spec = yaml.safe_load((REPO / "configs" / "tiny-cpu-axpo.yaml").read_text())
    spec.update(name=name, steps=steps, questions_per_step=2, model=str(model))
    spec["algorithm"]["name"] = "grpo"
    spec["algorithm"]["group_size"] = 2
    spec["rollout"]["max_new_tokens"] = 32
    spec["run"]["prepare_model"] = "none"
    spec["run"]["learner"] = {**spec["run"].get("learner", {}), **learner}
    spec.pop("eval")
    return spec


class _Supervising:
    """``Deployment.watch`` in a thread (what ``axpo deploy`` does in its main thread)."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.dep.watch(until=self.done.is_set, poll_s=0.2)
        except RunError as exc:  # reported by the fixture's teardown
            self.error = exc

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Any]]:
    from axpo.study.tiny_model import build_tiny_model
    from axpo_client import Client

    root = tmp_path_factory.mktemp("deployment")
    model = build_tiny_model(root / "model", max_pixels=4096)
    env = {
        **settings_env("AXPO_INFERENCE_", {"max_model_len": 2560, "kv_cache_gib": 1.0}),
        **settings_env(
            "AXPO_TOOLS_",
            {"zoom": {"min_pixels": 4096, "max_pixels": 4096, "output_format": "png"}},
        ),
    }
    dep = Deployment(
        root / "dep",
        Path(model),
        restarts=RestartSpec(max=3, backoff_s=0.5, max_backoff_s=1.0),
        env=env,
    )
    supervising = None
    try:
        url = dep.start()
        supervising = _Supervising(dep)
        client = Client(url, (dep.root / "api-token").read_text().strip())
        yield dep, client
        assert supervising.error is None, supervising.error
    finally:
        if supervising is not None:
            supervising.stop()
        dep.stop()


def _wait(what: str, cond: Callable[[], Any], timeout: float, dep: Deployment) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    logs = {n: c.log_tail(15) for n, c in dep.children.items()}
    raise AssertionError(f"timed out waiting for {what}; logs:\n{json.dumps(logs, indent=1)}")


def _ended(client: Any, job_id: str, timeout: float, dep: Deployment) -> Any:
    """The job once it has ended (succeeded, failed or cancelled)."""
    return _wait(
        f"job {job_id} to end", lambda: (j := client.get(job_id)).state.finished and j, timeout, dep
    )


def _events(client: Any, job_id: str) -> list[Any]:
    job = client.get(job_id)
    assert job.state in ("succeeded", "failed", "cancelled"), job.state
    return list(client.events(job_id))


def test_a_job_submitted_with_axpo_job_submit_watch_succeeds_with_run_artefacts(
    deployment: tuple[Deployment, Any], tmp_path: Path
) -> None:
    dep, client = deployment
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_spec(dep.model, "dep-submit", 2)))
    env = {
        **os.environ,
        "AXPO_API_URL": dep.api_url,
        "AXPO_API_TOKEN": (dep.root / "api-token").read_text().strip(),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "axpo", "job", "submit", str(config), "--watch", "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads(proc.stdout)
    assert job["state"] == "succeeded", job
    assert job["step"] == 2
    folder = dep.root / "jobs" / job["id"]
    # The files axpo run writes for a job (but the evaluation, which this job does not ask for).
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert (folder / "checkpoints" / "step-00000002" / "meta.json").is_file()
    assert (folder / "final-model" / "config.json").is_file()
    assert (folder / "report.md").read_text().startswith("# axpo job")
    assert yaml.safe_load((folder / "config.yaml").read_text())["name"] == "dep-submit"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["state"] == "succeeded"
    assert summary["steps"] == 2
    # The api serves what the learner recorded.
    assert [m["step"] for m in client.metrics(job["id"])] == [1, 2]
    kinds = [e.type for e in _events(client, job["id"])]
    assert kinds.count("step") == 2
    assert "checkpoint" in kinds
    assert kinds[-1] == "state"


def test_a_job_cancelled_through_the_api_ends_cancelled_with_a_checkpoint(
    deployment: tuple[Deployment, Any],
) -> None:
    dep, client = deployment
    job = client.submit(_spec(dep.model, "dep-cancel", 50, checkpoint_every=50))
    _wait("the first step", lambda: client.get(job.id).step >= 1, 400, dep)
    client.cancel(job.id)
    final = _ended(client, job.id, 180, dep)
    assert final.state == "cancelled"
    assert 1 <= final.step < 50
    assert client.checkpoints(job.id), "the learner checkpoints when cancelled"
    folder = dep.root / "jobs" / job.id
    assert json.loads((folder / "summary.json").read_text())["state"] == "cancelled"
    # The deployment stays up, idle.
    assert all(c.proc.poll() is None for c in dep.children.values())


def test_a_learner_killed_mid_job_is_restarted_and_resumes_the_job(
    deployment: tuple[Deployment, Any],
) -> None:
    dep, client = deployment
    job = client.submit(_spec(dep.model, "dep-crash", 4, checkpoint_every=1))
    _wait("two steps", lambda: client.get(job.id).step >= 2, 400, dep)
    learner = dep.children["learner"]
    old_pid = learner.proc.pid
    os.killpg(old_pid, signal.SIGKILL)
    final = _ended(client, job.id, 600, dep)
    assert learner.proc.pid != old_pid, "the supervisor restarted the learner"
    assert final.state == "succeeded", final.error
    # Every step once in the job's records (a step trained again after the restart replaces
    # its record), resumed from a checkpoint rather than from step 0.
    assert [m["step"] for m in client.metrics(job.id)] == [1, 2, 3, 4]
    restarts = [e.data for e in _events(client, job.id) if e.type == "restart"]
    assert [r["process"] for r in restarts] == ["learner"]
    assert "SIGKILL" in restarts[0]["reason"]
    log = learner.log_path.read_text()
    assert "resumed from" in log


def test_two_jobs_run_one_after_the_other_the_second_from_the_base_weights(
    deployment: tuple[Deployment, Any],
) -> None:
    dep, client = deployment
    first = client.submit(_spec(dep.model, "dep-first", 2))
    second = client.submit(_spec(dep.model, "dep-second", 2))
    _wait("the first job to start", lambda: client.get(first.id).state == "running", 120, dep)
    assert client.get(second.id).state == "queued", "one job at a time per deployment"
    for job in (first, second):
        final = _ended(client, job.id, 600, dep)
        assert final.state == "succeeded", final.error
    first_versions = [e.data["version"] for e in _events(client, first.id) if e.type == "publish"]
    second_versions = [e.data["version"] for e in _events(client, second.id) if e.type == "publish"]
    assert first_versions
    assert second_versions
    # The second job's first weights (the base model, published at its start) come above the
    # first job's last version: the replicas accept them, and no group of the first job's
    # weights is trained in the second.
    store_runtime = _runtime(dep, second.id)
    assert store_runtime["base_version"] > max(first_versions)
    assert min(second_versions) >= store_runtime["base_version"]


def test_an_inference_service_killed_mid_job_is_restarted_and_gets_the_jobs_weights_again(
    deployment: tuple[Deployment, Any],
) -> None:
    dep, client = deployment
    # Long enough that steps after the restart need new samples (the backlog holds two
    # steps' groups sampled before it).
    job = client.submit(_spec(dep.model, "dep-inference", 8, checkpoint_every=1))
    _wait("two steps", lambda: client.get(job.id).step >= 2, 400, dep)
    inference = dep.children["inference"]
    old_pid = inference.proc.pid
    os.killpg(old_pid, signal.SIGKILL)
    final = _ended(client, job.id, 900, dep)
    assert inference.proc.pid != old_pid, "the supervisor restarted the inference service"
    assert final.state == "succeeded", final.error
    assert [m["step"] for m in client.metrics(job.id)] == list(range(1, 9))
    events = _events(client, job.id)
    assert [e.data["process"] for e in events if e.type == "restart"] == ["inference"]
    learner_log = dep.children["learner"].log_path.read_text()
    assert "(restarted?): publishing again" in learner_log
    # The restarted replica serves the job's newest weights, not its starting ones.
    assert _served_version(dep) == max(e.data["version"] for e in events if e.type == "publish")


def _served_version(dep: Deployment) -> int:
    from axpo.local.launcher import _served_version as served

    version = served(dep.children["inference"])
    assert version is not None
    return version


def _runtime(dep: Deployment, job_id: str) -> dict[str, Any]:
    assert dep._store is not None
    runtime = dep._store.runtime(job_id)
    assert runtime is not None
    return runtime
