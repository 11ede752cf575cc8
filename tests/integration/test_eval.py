"""``axpo eval``'s core on real services: the vLLM CPU engine behind the inference gRPC server,
the tool server (zoom and search) and the verifier server, in process on port 0, with the tiny
random-init model. ``axpo eval --inference --tools --verifier`` (what a training run calls at
its end; ``run_eval`` runs the same code once it has started the services) evaluates 3
held-out questions (one per family: two with an image, one text-only) with n=2 samples each.

Checked: the summary line has every figure, overall and per family, each in its range; the
per-question file has one record per question, of the right family, held-out seed and gold,
with n samples each; and the summary is what the file's records add up to (counted here
independently of the module's own summing).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("vllm")

from axpo.cli.main import main
from axpo.settings.base import RpcServerSettings
from axpo.settings.inference import InferenceSettings
from axpo.settings.job import JobSpec, load_job_spec
from axpo.settings.tools import ToolsSettings, ZoomSettings
from axpo.settings.verifier import VerifierSettings
from axpo.study import tasks
from axpo.study.tiny_model import build_tiny_model
from axpo_inference import server as inference_server
from axpo_inference.engine import InferenceEngine
from axpo_rollout.evaluate_metrics import QuestionResult, summarize
from axpo_tools import server as tools_server
from axpo_tools.toolbox import Toolbox
from axpo_verifier import server as verifier_server
from axpo_verifier.verifier import Verifier

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RPC = RpcServerSettings(host="127.0.0.1", port=0, log_requests=False)
FAMILIES = ("zoom_digits", "colour_cell", "town_facts")
N = 2
FIGURES = (
    "pass_at_1",
    "pass_at_2",
    "accuracy",
    "tool_call_rate",
    "tool_call_valid_rate",
    "accuracy_with_tools",
    "accuracy_without_tools",
    "truncated_rate",
    "chance",
)
COUNTS = ("questions", "rollouts", "tool_calls", "rollouts_with_tools", "rollouts_without_tools")


@dataclass
class Services:
    inference: str
    tools: str
    verifier: str
    model: Path


def _tools_settings() -> ToolsSettings:
    return ToolsSettings(
        rpc=RPC, zoom=ZoomSettings(min_pixels=4096, max_pixels=16384), python={"enabled": False}
    )


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    model = build_tiny_model(tmp_path_factory.mktemp("eval") / "tiny", seed=0)
    settings = InferenceSettings(model=str(model), max_model_len=2048, rpc=RPC)
    toolbox = Toolbox(_tools_settings())
    toolbox.start()
    with InferenceEngine(settings) as engine, Verifier(VerifierSettings(rpc=RPC)) as verifier:
        running = [
            inference_server.start(settings, engine),
            tools_server.start(_tools_settings(), toolbox),
            verifier_server.start(VerifierSettings(rpc=RPC), verifier),
        ]
        try:
            yield Services(*(r.address for r in running), model=model)  # type: ignore[misc]
        finally:
            for r in running:
                r.stop(1)
            toolbox.close()
    # Collect the stopped engine now: its vLLM output task, finalized later during an import,
    # logs a traceback whose formatting parses Python (3.11's traceback carets) inside the
    # importer's AST conversion, which CPython 3.11 reports as an AST recursion mismatch.
    gc.collect()


def _spec(model: Path) -> JobSpec:
    spec = load_job_spec(REPO / "configs" / "tiny-cpu-axpo.yaml")
    return spec.model_copy(
        update={
            "model": str(model),
            "tasks": spec.tasks.model_copy(update={"image_size": 128}),
            "rollout": spec.rollout.model_copy(
                update={
                    "tools": ["image_zoom_in_tool", "search"],
                    "max_turns": 2,
                    "max_new_tokens": 24,
                    "inflight_questions": 3,
                }
            ),
        }
    )


def _check_figures(figures: dict[str, Any], questions: int) -> None:
    assert figures["questions"] == questions
    assert figures["n"] == N
    assert figures["rollouts"] == questions * N
    for key in FIGURES:
        value = figures[key]
        assert value is None or 0.0 <= value <= 1.0, (key, value)
    assert figures["pass_at_1"] <= figures["pass_at_2"]
    assert figures["mean_generated_tokens"] > 0
    assert figures["rollouts_with_tools"] + figures["rollouts_without_tools"] == figures["rollouts"]


def test_eval_on_the_real_services(
    services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.jsonl"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_spec(services.model).model_dump(mode="json")))
    # As a training run's launcher calls it: the CLI on the running services' addresses.
    rc = main(
        [
            "eval",
            "--inference",
            services.inference,
            "--tools",
            services.tools,
            "--verifier",
            services.verifier,
            "--model",
            str(services.model),
            "--config",
            str(config),
            "--tasks",
            ",".join(FAMILIES),
            "--questions",
            "1",
            "--n",
            str(N),
            "--k",
            "1,2",
            "--out",
            str(out),
            "--json",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    progress = [x for x in printed.err.splitlines() if x.startswith("eval: ")]
    assert len(progress) == len(FAMILIES)  # one progress line per question
    [line] = printed.out.splitlines()  # ONE JSON line
    # The summary line: every figure in range, overall and per family.
    result = json.loads(line)
    _check_figures(result, len(FAMILIES))
    assert list(result["families"]) == list(FAMILIES)
    for family in FAMILIES:
        _check_figures(result["families"][family], 1)
    assert result["split"] == "heldout"
    assert result["ks"] == [1, 2]
    assert result["tools"] == ["image_zoom_in_tool", "search"]
    assert len(result["policy_versions"]) == 1
    assert result["wall_s"] > 0
    assert result["out"] == str(out)

    # The per-question file: one record per question, the question it claims to be.
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["family"] for r in records] == list(FAMILIES)
    for r in records:
        assert r["seed"] >= tasks.HELDOUT_BASE
        task = tasks.generate_task(r["family"], r["seed"], 128)
        assert (r["task_id"], r["gold"]) == (task.task_id, task.gold)
        assert r["n"] == len(r["samples"]) == N
        assert r["correct"] == sum(s["correct"] for s in r["samples"])
        assert r["pass_at_1"] == pytest.approx(r["correct"] / N)
        for s in r["samples"]:
            assert s["tokens"] > 0
            assert all(set(c) == {"name", "valid", "error", "arguments"} for c in s["tool_calls"])

    # The summary is what the records add up to: counted here, and summed by the module.
    samples = [s for r in records for s in r["samples"]]
    calls = [c for s in samples for c in s["tool_calls"]]
    assert result["accuracy"] == pytest.approx(
        sum(s["correct"] for s in samples) / len(samples), abs=1e-6
    )
    assert result["tool_call_rate"] == pytest.approx(
        sum(bool(s["tool_calls"]) for s in samples) / len(samples), abs=1e-6
    )
    assert result["tool_calls"] == len(calls)
    if calls:
        assert result["tool_call_valid_rate"] == pytest.approx(
            sum(c["valid"] for c in calls) / len(calls), abs=1e-6
        )
    assert result["mean_generated_tokens"] == pytest.approx(
        sum(s["tokens"] for s in samples) / len(samples), abs=1e-6
    )
    assert result["pass_at_2"] == pytest.approx(
        sum(r["pass_at_2"] for r in records) / len(records), abs=1e-6
    )
    again = summarize([QuestionResult.from_json(r) for r in records], [1, 2])
    assert {k: v for k, v in result.items() if k in again} == again
    for key in COUNTS:
        assert result[key] == again[key]
