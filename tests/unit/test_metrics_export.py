"""axpo.telemetry.metrics: Prometheus gauges in a private registry, /metrics over HTTP, JSONL."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from axpo.algorithm.diagnostics import DIAGNOSTIC_KEYS
from axpo.telemetry.metrics import StepMetrics, append_jsonl, metric_name


def lines(metrics: StepMetrics) -> set[str]:
    return set(metrics.render().decode().splitlines())


def test_metric_name() -> None:
    assert metric_name("time.generate_s") == "axpo_time_generate_s"
    assert metric_name("tool_error_rate.malformed_call") == "axpo_tool_error_rate_malformed_call"
    assert metric_name("a-b c") == "axpo_a_b_c"


def test_update_then_render() -> None:
    m = StepMetrics(help_texts={"loss": "Policy loss of the step."})
    before = m.render().decode()
    for key in DIAGNOSTIC_KEYS:  # every diagnostic has a gauge from the start
        assert f"# TYPE {metric_name(key)} gauge" in before
    m.update(7, {"tool_call_rate": 0.5, "time.generate_s": 1.25, "loss": -0.5, "step": 99})
    out = lines(m)
    assert "axpo_tool_call_rate 0.5" in out
    assert "axpo_time_generate_s 1.25" in out
    assert "axpo_loss -0.5" in out
    assert "axpo_step 7.0" in out  # the argument, not the record's "step" key
    assert "# HELP axpo_loss Policy loss of the step." in out
    m.update(8, {"tool_call_rate": 0.25, "turns_max": 3})
    out = lines(m)
    assert "axpo_tool_call_rate 0.25" in out
    assert "axpo_turns_max 3.0" in out
    assert "axpo_loss -0.5" in out  # not in this update: keeps its last value


def test_two_instances_do_not_collide() -> None:
    a, b = StepMetrics(), StepMetrics()
    a.update(1, {"accuracy": 1.0})
    b.update(1, {"accuracy": 0.0})
    assert "axpo_accuracy 1.0" in lines(a)
    assert "axpo_accuracy 0.0" in lines(b)


def test_rejects_bad_values_and_clashing_names() -> None:
    m = StepMetrics()
    with pytest.raises(TypeError, match="not a number"):
        m.update(1, {"accuracy": 0.5, "x": "high"})  # type: ignore[dict-item]
    assert "axpo_accuracy 0.0" in lines(m)  # nothing was set
    with pytest.raises(ValueError, match="axpo_time_generate_s"):
        m.update(1, {"time_generate_s": 1.0})


def test_http_serves_metrics() -> None:
    with StepMetrics() as m:
        m.update(3, {"tool_call_rate": 0.5})
        port = m.start_http(0)
        assert port > 0
        with pytest.raises(RuntimeError):
            m.start_http(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert "axpo_tool_call_rate 0.5" in body.splitlines()
        m.close()
        m.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_append_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    append_jsonl(path, {"step": 0, "loss": 0.5, "time.tools_s": 1.0})
    append_jsonl(path, {"step": 1, "loss": math.nan, "nested": {"x": math.inf}, "tag": "a"})
    text = path.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert records == [
        {"step": 0, "loss": 0.5, "time.tools_s": 1.0},
        {"step": 1, "loss": None, "nested": {"x": None}, "tag": "a"},
    ]
