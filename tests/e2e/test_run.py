"""`axpo run` end to end: a 2-step job on the tiny model with every service as a real local
process (Redis, the api, vLLM CPU inference, tools, verifier, learner, a rollout worker), its
job read back through the Python client; then Ctrl-C in the middle of a run. Both check that
no process outlives the run. A cancel through the api: test_run_cancel.py."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from axpo.jobs.records import json_safe
from axpo.queue.redis_server import RedisServer
from axpo_client import Client
from tests.integration.api_fixtures import TOKEN, start_api

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _job(
    tmp_path: Path, name: str, steps: int, algorithm: str = "axpo", prepare: str = "tiny"
) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "tiny-cpu-axpo.yaml").read_text())
    spec["name"] = name
    spec["steps"] = steps
    spec["questions_per_step"] = 2
    spec["model"] = str(tmp_path / "model")
    spec["algorithm"]["name"] = algorithm
    spec["algorithm"]["group_size"] = 2
    spec["rollout"]["max_new_tokens"] = 32
    # "tiny": random init, seconds to build; "tiny-sft": the demo's SFT stage, cut to 2 steps.
    spec["run"]["prepare_model"] = prepare
    spec["run"]["demos"] = {"per_family": 4, "tool_rate": 0.5}
    spec["run"]["sft"] = {"steps": 2, "batch_size": 4}
    spec["eval"] = {"questions": 1, "n": 2, "k": [1, 2], "before": True, "every": 1}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def spec_families(config: Path) -> list[str]:
    family = yaml.safe_load(config.read_text())["tasks"]["family"]
    return [family] if isinstance(family, str) else list(family)


def _alive_in_run(run_dir: Path) -> list[str]:
    """Processes of the run still alive: its children and anything in their process groups."""
    pids = set(json.loads((run_dir / "pids.json").read_text()).values())
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgid = fields[0], int(fields[2])
        if state != "Z" and (int(entry.name) in pids or pgid in pids):
            alive.append(f"{entry.name} {stat[: stat.rindex(')') + 1]}")
    return alive


def _axpo(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "axpo", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


def test_run_trains_two_steps_and_leaves_a_report(tmp_path: Path) -> None:
    config = _job(tmp_path, "e2e-run", steps=2, prepare="tiny-sft")
    run_dir = tmp_path / "run"
    proc = _axpo("run", str(config), "--run-dir", str(run_dir), "--no-progress")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    summary = run_summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1.0, 2.0]
    for r in records:
        assert r["groups"] == 2
        assert r["rollouts"] >= 4  # 2 questions x G=2, plus any AXPO resamples on top
        assert 0 <= r["tool_call_rate"] <= 1
        assert r["policy_lag_max"] <= 2  # the learner's max_policy_lag in the config
    # The learner published version 1 after step 1; step 2 trained on groups the rollout
    # worker sampled on whichever version was serving: never newer than the learner's.
    assert records[1]["policy_version"] == 2.0
    report = (run_dir / "report.md").read_text()
    assert "reward_mean" in report
    # Every metric these plots draw is logged at every step, so each plot must be written,
    # linked from the report, and be a PNG; and nothing else is in plots/.
    linked = set(re.findall(r"\]\(plots/([^)]+\.png)\)", report))
    always = {"reward.png", "tool_call_rate.png", "loss.png", "time_split.png"}
    assert always <= linked, f"plots not in the report: {always - linked}"
    written = {png.name for png in (run_dir / "plots").glob("*.png")}
    assert written == linked
    for name in written:
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert any((run_dir / "checkpoints").iterdir())
    assert "step 2/2" in err
    # The model was prepared by the SFT stage: demonstrations of every family, then axpo sft.
    families = spec_families(config)
    demos = (tmp_path / "model-demos" / "demos.jsonl").read_text().splitlines()
    assert len(demos) == 4 * len(families)
    assert json.loads((tmp_path / "model" / "sft.json").read_text())["metrics"]["steps"] == 2
    # The held-out evaluation before and after training, through the run's own services.
    for name in ("eval-before", "eval"):
        summary = json.loads((run_dir / f"{name}.json").read_text())
        assert summary["questions"] == len(families)
        assert set(summary["families"]) == set(families)
        lines = (run_dir / f"{name}.jsonl").read_text().splitlines()
        assert all(json.loads(x)["seed"] >= 1_000_000 for x in lines)  # held-out questions
    assert "| before | all |" in report
    assert "| after | all |" in report
    # eval.every: 1 evaluated after step 1 while step 2 trained; the curve is in the report.
    during = json.loads((run_dir / "evals" / "step-1.json").read_text())
    assert during["step"] == 1
    assert set(during["families"]) == set(families)
    assert "plots/heldout.png" in report
    # The learner exported the final policy as a complete checkpoint.
    assert (run_dir / "final-model" / "config.json").is_file()
    assert list((run_dir / "final-model").glob("*.safetensors"))
    assert _alive_in_run(run_dir) == []
    _check_job_through_the_client(run_dir, run_summary, records)


def _check_job_through_the_client(
    run_dir: Path, summary: dict[str, object], records: list[dict[str, object]]
) -> None:
    """The run's job, as a client sees it: the run's Redis started again from its append-only
    file, an api over it, and the Python client."""
    assert summary["state"] == "succeeded"
    assert str(summary["api_url"]).startswith("http://127.0.0.1:")
    assert (run_dir / "api-url").read_text().strip() == summary["api_url"]
    assert stat.S_IMODE((run_dir / "api-token").stat().st_mode) == 0o600
    job_id = str(summary["job_id"])
    server = RedisServer(run_dir / "redis")
    server.start()
    api, thread = start_api(server, key_prefix="axpo", tokens=(TOKEN,))
    try:
        with Client(api.url, TOKEN) as client:
            job = client.get(job_id)
            assert job.state == "succeeded"
            assert job.step == 2
            assert client.metrics(job_id) == [json_safe(r) for r in records]
            events = list(client.events(job_id))
            states = [e.data["state"] for e in events if e.type == "state"]
            assert states == ["queued", "running", "succeeded"]
            steps = [e.data["step"] for e in events if e.type == "step"]
            assert steps == [1.0, 2.0]
            # The learner checkpoints every step and publishes versions 1 and 2.
            assert [e.data["step"] for e in events if e.type == "checkpoint"] == [1, 2]
            assert [e.data["version"] for e in events if e.type == "publish"] == [1, 2]
    finally:
        api.server.should_exit = True
        thread.join(timeout=10)
        server.stop()


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    config = _job(tmp_path, "e2e-interrupt", steps=50, algorithm="grpo")
    run_dir = tmp_path / "run"
    proc = _axpo("run", str(config), "--run-dir", str(run_dir), "--no-progress")
    assert proc.stderr is not None
    deadline = time.monotonic() + 400
    seen = ""
    while "starting learner" not in seen:  # the inference engine is up: the most to stop
        line = proc.stderr.readline()
        assert line or proc.poll() is None, seen
        seen += line
        assert time.monotonic() < deadline, seen
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + err
    assert "every process was stopped" in err
    assert _alive_in_run(run_dir) == []
    assert not (run_dir / "report.md").exists()
    # Ctrl-C cancelled the job through the api; its final state was read back.
    assert json.loads((run_dir / "summary.json").read_text())["state"] == "cancelled"
