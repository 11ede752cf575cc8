"""The axpo CLI as a person runs it: real processes, real service, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

AXPO = [sys.executable, "-m", "axpo.cli.main"]
REPO = Path(__file__).resolve().parents[2]


def axpo(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AXPO, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_lists_the_commands():
    out = axpo("--help")
    assert out.returncode == 0
    for command in ("serve", "verify", "bench", "job"):
        assert command in out.stdout


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys; from axpo.cli.main import build_parser; build_parser(); "
        "heavy = [m for m in ('grpc', 'pydantic', 'sympy', 'math_verify', 'torch', "
        "'axpo_verifier') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "stdin", "correct", "extracted"),
    [
        (["--kind", "choice", "--gold", "B"], "<think>A?</think>\n\nThe answer is (B).", True, "B"),
        (["--kind", "number", "--gold", "42"], "</think>\n\n<answer>41</answer>", False, "41"),
        (
            ["--kind", "number", "--gold", "1000", "--rel-tol", "0.05"],
            "about 1,040 people",
            True,
            None,
        ),
        (
            ["--kind", "text", "--gold", "Eiffel Tower"],
            "</think>The answer is the eiffel tower.",
            True,
            None,
        ),
        (["--kind", "math", "--gold", "\\frac{1}{2}"], "</think>\\boxed{0.5}", True, "0.5"),
    ],
    ids=["choice", "number-wrong", "number-tol", "text", "math"],
)
def test_verify_prints_a_verdict(args, stdin, correct, extracted):
    out = axpo("verify", *args, stdin=stdin)
    assert out.returncode == 0, out.stderr
    verdict = json.loads(out.stdout)
    assert {"correct", "reward", "extracted", "reason"} <= verdict.keys()
    assert verdict["correct"] is correct
    assert isinstance(verdict["reward"], float)
    assert verdict["reason"]
    if extracted is not None:
        assert verdict["extracted"] == extracted


def test_verify_without_an_answer_is_still_a_verdict():
    out = axpo("verify", "--kind", "number", "--gold", "3", stdin="")
    assert out.returncode == 0
    verdict = json.loads(out.stdout)
    assert verdict["correct"] is False
    assert verdict["extracted"] is None


def test_verify_explain_says_each_step():
    stdin = "<think>x</think>First $\\boxed{255}$. The final answer is $10,455$<|im_end|>\nuser"
    out = axpo("verify", "--kind", "number", "--gold", "10455", "--explain", stdin=stdin)
    assert out.returncode == 0, out.stderr
    verdict = json.loads(out.stdout)
    assert verdict["correct"] is True
    steps = verdict["explain"]
    assert steps[0].startswith("turn: dropped")
    assert "rule 2 \\boxed: '255'" in steps
    assert steps[-2] == "rule 3 'the answer is' after the last box wins: '$10,455$'"
    assert steps[-1].startswith("checker number: correct: number 10455 == gold 10455")
    plain = json.loads(axpo("verify", "--kind", "number", "--gold", "1", stdin="1").stdout)
    assert "explain" not in plain


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "choice", "--gold", "B", "--choices", "[1, 2]"], "--choices"),
        (["--kind", "choice", "--gold", "B", "--choices", "not json"], "--choices"),
        (["--kind", "number", "--gold", "3", "--rel-tol", "-1"], "--rel-tol"),
        (["--kind", "number", "--gold", "3", "--rel-tol", "nan"], "--rel-tol"),
        (["--kind", "bogus", "--gold", "3"], "--kind"),
        (["--gold", "3"], "--kind"),
        (["--kind", "number", "--gold", "3", "--time-limit", "0"], "--time-limit"),
        (["--kind", "number", "--gold", "3", "--explain", "--server", "h:1"], "--explain"),
    ],
    ids=[
        "choices-type",
        "choices-json",
        "neg-tol",
        "nan-tol",
        "kind",
        "no-kind",
        "time-limit",
        "explain-remote",
    ],
)
def test_verify_bad_arguments_exit_2(args, message):
    out = axpo("verify", *args, stdin="42")
    assert out.returncode == 2
    assert message in out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "add --tiny"),
        (["--model", ".", "--rollout-workers", "0"], "--rollout-workers 0"),
        (["--model", ".", "--max-restarts", "-1"], "--max-restarts -1"),
    ],
    ids=["no-model", "workers", "restarts"],
)
def test_deploy_bad_arguments_exit_2_before_starting_anything(args, message, tmp_path):
    out = axpo("deploy", "--dir", str(tmp_path / "dep"), *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "dep").exists()


def test_deploy_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    out = axpo("deploy", "--dir", str(tmp_path / "dep"), "--model", str(tmp_path))
    assert out.returncode == 1
    assert "not a checkpoint directory (no config.json)" in out.stderr


def test_job_check(tmp_path):
    ok = axpo("job", "check", str(REPO / "configs" / "example-job.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["algorithm"]["rho"] == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\nalgorithm: {group_size: 1}\n")
    out = axpo("job", "check", str(bad))
    assert out.returncode == 2
    assert "algorithm.group_size" in out.stderr


def test_serve_verify_through_grpc_and_stop_on_sigterm(tmp_path):
    port_file = tmp_path / "port"
    env = {**os.environ, "AXPO_VERIFIER_LOG__FORMAT": "json"}
    server = subprocess.Popen(
        [*AXPO, "serve", "verifier", "--port", "0", "--port-file", str(port_file)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "server did not write its port"
            time.sleep(0.05)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        out = axpo(
            "verify",
            "--server",
            target,
            "--kind",
            "number",
            "--gold",
            "7",
            "--tool-calls",
            "2",
            "--tool-bonus-weight",
            "0.5",
            stdin="<think>3+4</think>\n\n<answer>7</answer>",
        )
        assert out.returncode == 0, out.stderr
        verdict = json.loads(out.stdout)
        assert verdict["correct"] is True
        assert verdict["tool_bonus"] == 1.0
        assert verdict["reward"] == pytest.approx(1.0 + 0.1 * verdict["format"] + 0.5)
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("Score" in json.dumps(line) for line in lines), stderr


def test_readme_demo_command_is_the_axpo_run_of_a_valid_config():
    """`make demo` (the README's first command) runs `axpo run configs/tiny-cpu-axpo.yaml`; the
    run itself is exercised end to end by tests/e2e/test_run.py (the demo's SFT stage and
    15 steps take minutes, measured in the README)."""
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert "axpo run configs/tiny-cpu-axpo.yaml" in script
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme.split("\n## ")[0]
    for config in ("tiny-cpu-axpo.yaml", "tiny-cpu-grpo.yaml"):
        text = (REPO / "configs" / config).read_text()
        assert text.startswith(f"# Run it:  axpo run configs/{config}")
        out = subprocess.run(
            [sys.executable, "-m", "axpo", "job", "check", f"configs/{config}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)
        assert job["rollout"]["tools"] == ["image_zoom_in_tool", "python", "search"]
        assert job["tasks"]["family"] == ["colour_cell", "arith", "town_facts"]
        assert job["run"]["prepare_model"] == "tiny-sft"
        assert job["eval"]["before"] is True
