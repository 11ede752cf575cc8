"""``axpo eval`` on the command line: bad arguments are exit 2 with a message naming the
problem, before any service starts; the people's table. (The whole command against real
services: tests/integration/test_eval.py runs the same code path through ``run_eval``.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from axpo.cli.evaluate import print_table
from axpo.cli.main import main

REPO = Path(__file__).resolve().parents[3]
CONFIG = str(REPO / "configs" / "tiny-cpu-axpo.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "zoom_digits,nope"], "unknown task families ['nope']"),
        (["--tasks", "zoom_digits", "--n", "4", "--k", "1,8"], "k = [8]"),
        (["--tasks", "zoom_digits", "--k", "1,x"], "--k takes comma-separated integers"),
        (["--tasks", "zoom_digits", "--n", "0"], "n must be in [1, 256]"),
        (["--tasks", "zoom_digits", "--questions", "0"], "questions per family must be >= 1"),
        (["--tasks", "zoom_digits", "--temperature", "0"], "temperature must be > 0"),
        # No --k with n=2: the default ks are those of 1,4 that fit (1), so the next check,
        # the model directory, is what fails.
        (["--tasks", "zoom_digits", "--n", "2"], "model directory /nonexistent does not exist"),
        (["--tasks", "zoom_digits", "--config", "/nonexistent.yaml"], "cannot read"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["eval", "--config", CONFIG, "--model", "/nonexistent", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err


def test_running_services_are_all_three_or_none(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "--config", CONFIG, "--tasks", "arith", "--inference", "127.0.0.1:1"])
    assert rc == 2
    assert "give all of --inference, --tools, --verifier, or none" in capsys.readouterr().err


def test_running_services_that_do_not_answer_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from axpo.study.tiny_model import build_tiny_model
    from axpo_rollout import evaluate

    monkeypatch.setattr(evaluate, "HEALTH_TIMEOUT_S", 0.3)
    model = build_tiny_model(tmp_path / "tiny", seed=0)
    down = ["--inference", "127.0.0.1:1", "--tools", "127.0.0.1:1", "--verifier", "127.0.0.1:1"]
    rc = main(["eval", "--config", CONFIG, "--tasks", "arith", "--model", str(model), *down])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "axpo eval: 127.0.0.1:1: server not SERVING after 0.3 s" in err
    # Without a tokenizer in --model it is a usage error, before any connection.
    rc = main(["eval", "--config", CONFIG, "--tasks", "arith", "--model", str(tmp_path), *down])
    assert rc == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_the_table_has_a_row_per_family_and_overall(capsys: pytest.CaptureFixture[str]) -> None:
    figures = {
        "pass_at_1": 0.5,
        "pass_at_2": 0.75,
        "accuracy": 0.5,
        "tool_call_rate": 0.25,
        "tool_call_valid_rate": None,
        "accuracy_with_tools": None,
        "accuracy_without_tools": 0.5,
        "mean_generated_tokens": 12.5,
        "chance": 0.25,
    }
    print_table(
        {
            **figures,
            "families": {"zoom_digits": figures, "arith": {**figures, "accuracy": 0.125}},
            "ks": [1, 2],
            "model": "m",
            "questions": 4,
            "split": "heldout",
            "n": 2,
            "temperature": 1.0,
            "wall_s": 3.0,
            "out": "r.jsonl",
        }
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model m: 4 heldout questions x n=2 at temperature 1.0 (3.0 s)"
    assert lines[1].split() == [
        "pass_at_1",
        "pass_at_2",
        "accuracy",
        "tool_call_rate",
        "tool_call_valid_rate",
        "accuracy_with_tools",
        "accuracy_without_tools",
        "mean_generated_tokens",
        "chance",
    ]
    row = "zoom_digits 0.500 0.750 0.500 0.250 - - 0.500 12.500 0.250"
    assert lines[2].split() == row.split()
    assert lines[3].split()[:4] == ["arith", "0.500", "0.750", "0.125"]
    assert lines[4].split()[0] == "overall"
    assert lines[5] == "per-question results: r.jsonl"
