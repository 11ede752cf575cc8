"""Toolbox.call never raises: every failure is a ToolResult with an error kind."""

from __future__ import annotations

import json

import pytest

from axpo.contracts.domain import ToolCall, ToolErrorKind
from axpo.settings.tools import PythonToolSettings, ToolsSettings
from axpo_tools.toolbox import Toolbox


@pytest.fixture(scope="module")
def toolbox():
    box = Toolbox(ToolsSettings(python=PythonToolSettings(enabled=False)))
    yield box
    box.close()


def call(name: str, arguments: object) -> ToolCall:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall("call_0", name, raw)


def test_specs_list_the_enabled_tools(toolbox):
    assert [s.name for s in toolbox.specs()] == ["image_zoom_in_tool", "search"]
    for spec in toolbox.specs():
        assert json.loads(spec.parameters_json_schema)["type"] == "object"
        assert spec.description


@pytest.mark.parametrize(
    ("tool_call", "kind", "message"),
    [
        (call("nope", {}), ToolErrorKind.UNKNOWN_TOOL, "unknown tool 'nope'"),
        (call("search", "{not json"), ToolErrorKind.BAD_ARGUMENTS, "not valid JSON"),
        (call("search", "[1]"), ToolErrorKind.BAD_ARGUMENTS, "JSON object"),
        (call("search", {}), ToolErrorKind.BAD_ARGUMENTS, "'query' is a required property"),
        (call("search", {"query": 5}), ToolErrorKind.BAD_ARGUMENTS, "argument 'query'"),
        (
            call("image_zoom_in_tool", {"bbox_2d": [0, 0, 1, 1], "label": "x"}),
            ToolErrorKind.BAD_ARGUMENTS,
            "no image",
        ),
    ],
    ids=["unknown", "bad-json", "not-object", "missing", "mistyped", "no-image"],
)
def test_failures_become_results(toolbox, tool_call, kind, message):
    result = toolbox.call(tool_call, [])
    assert result.error is not None
    assert result.error.kind is kind
    assert message in result.error.message
    assert result.text.startswith(f"Error ({kind.value}):")
    assert result.latency_ms > 0


def test_a_tool_bug_is_an_internal_error(toolbox, monkeypatch):
    def broken(arguments, images=()):
        raise RuntimeError("boom")

    monkeypatch.setattr(toolbox, "search", broken)
    monkeypatch.setattr(broken, "name", "search", raising=False)
    result = toolbox.call(call("search", {"query": "x"}), [])
    assert result.error.kind is ToolErrorKind.INTERNAL
    assert "RuntimeError: boom" in result.error.message


def test_search_through_the_toolbox(toolbox):
    result = toolbox.call(call("search", {"query": "Which river?", "k": 1}), [])
    assert result.error is None
    assert result.text.startswith("1. ")
