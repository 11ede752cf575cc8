"""`axpo run` cancelled through its api from another shell: a long job on the tiny model (every
service a real local process), watched with ``axpo job watch`` and cancelled with ``axpo job
cancel``, both reading the run's ``api-url`` and ``api-token``, after its first step. The run
must stop (exit 1, saying the job was cancelled), the job end ``cancelled`` as the watcher sees
it, the learner's checkpoint be on disk, and no process be left over."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_run import _alive_in_run
from tests.e2e.test_supervision import _Lines

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS = 50


def _job(tmp_path: Path) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "tiny-cpu-axpo.yaml").read_text())
    spec.update(name="e2e-cancel", steps=STEPS, questions_per_step=2)
    spec["model"] = str(tmp_path / "model")
    spec["algorithm"]["name"] = "grpo"
    spec["algorithm"]["group_size"] = 2
    spec["rollout"]["max_new_tokens"] = 32
    spec["run"]["prepare_model"] = "tiny"  # random init: seconds to build
    spec.pop("eval")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _job_cli(run_dir: Path, *args: str) -> subprocess.Popen[str]:
    """``axpo job ...`` as a person runs it from another shell, with the run's URL and token."""
    env = {
        **os.environ,
        "AXPO_API_URL": (run_dir / "api-url").read_text().strip(),
        "AXPO_API_TOKEN": (run_dir / "api-token").read_text().strip(),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "axpo", "job", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_run_cancelled_with_axpo_job_cancel_stops_with_a_checkpoint(tmp_path: Path) -> None:
    config = _job(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "axpo",
            "run",
            str(config),
            "--run-dir",
            str(run_dir),
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = _Lines(proc.stderr)
    watch = None
    try:
        err.wait_for(" running; api http://127.0.0.1:", proc, 120)
        found = re.search(r"job (\S+) running; api", err.text)
        assert found, err.text
        job_id = found.group(1)
        watch = _job_cli(run_dir, "watch", job_id, "--no-progress")
        err.wait_for(f"step 1/{STEPS}", proc, 400)

        cancel = _job_cli(run_dir, "cancel", job_id)
        out, cancel_err = cancel.communicate(timeout=60)
        assert cancel.returncode == 0, cancel_err
        assert json.loads(out)["cancel_requested"] is True

        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
        if watch is not None and watch.poll() is None:
            watch.wait(30)
    # The run stops, saying why, with a non-zero exit (1, as for any run that did not finish).
    assert proc.returncode == 1, err.text[-4000:]
    assert f"job {job_id} was cancelled through the api after" in err.text
    assert out == ""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["job_id"] == job_id
    assert summary["state"] == "cancelled"
    assert 1 <= summary["steps"] < STEPS
    # The watcher in "another shell" saw the job end cancelled.
    assert watch is not None
    watched, watch_err = watch.communicate(timeout=30)
    assert watch.returncode == 0, watch_err
    final = json.loads(watched)
    assert (final["id"], final["state"]) == (job_id, "cancelled")
    # The learner checkpointed (every step, and at its SIGTERM) before it stopped.
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*/meta.json"))
    assert checkpoints, "no checkpoint on disk"
    last = json.loads(checkpoints[-1].read_text())["step"]
    assert last >= summary["steps"]
    assert "did not stop" not in err.text
    assert _alive_in_run(run_dir) == []
