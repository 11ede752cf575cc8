"""The tools a server offers, and one entry point that runs a call and never raises.

``Toolbox.call`` validates the arguments against the tool's JSON Schema (the same check the
rollout parser does, so a direct client gets the same errors), runs the tool, and turns every
failure into a ``ToolResult`` with an error kind: the model reads it as the tool response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

from axpo.contracts.chat import schema_problem, tool_error_text
from axpo.contracts.domain import Image, ToolCall, ToolError, ToolErrorKind, ToolResult, ToolSpec
from axpo.settings.tools import ToolsSettings
from axpo.telemetry.logs import get_logger, log_event
from axpo_tools.errors import ToolFailure
from axpo_tools.search import SearchTool
from axpo_tools.zoom import ZoomTool

log = get_logger("axpo.tools")


class Tool(Protocol):
    name: str

    def spec(self) -> dict[str, Any]: ...


class Toolbox:
    """Zoom, search and (when enabled) python. Thread-safe."""

    def __init__(self, settings: ToolsSettings) -> None:
        self.settings = settings
        self.zoom = ZoomTool(settings.zoom)
        self.search = SearchTool(settings.search)
        self.python = None
        if settings.python.enabled:
            from axpo_tools.python_tool import PythonTool

            self.python = PythonTool(settings.python)
        tools: list[Tool] = [self.zoom, self.search]
        if self.python is not None:
            tools.append(self.python)
        self._specs = {t.name: t.spec() for t in tools}

    def start(self) -> None:
        """Start what needs starting (the python warm pool); a server calls this before it
        accepts calls, so a machine without sandboxing fails at start, not at the first call."""
        if self.python is not None:
            self.python.start()

    def openai_specs(self) -> list[dict[str, Any]]:
        """``{"type": "function", "function": {...}}`` objects, for the chat template."""
        return list(self._specs.values())

    def specs(self) -> list[ToolSpec]:
        return [
            ToolSpec(
                name,
                s["function"]["description"],
                json.dumps(s["function"]["parameters"], ensure_ascii=False),
            )
            for name, s in self._specs.items()
        ]

    def call(
        self, call: ToolCall, images: Sequence[Image], deadline_s: float | None = None
    ) -> ToolResult:
        start = time.perf_counter()
        try:
            result = self._run(call, images, deadline_s)
        except ToolFailure as failure:
            error = ToolError(failure.kind, failure.message)
            result = ToolResult(text=tool_error_text(error), error=error)
        except Exception as exc:  # a tool bug must not end the rollout or the server
            log.exception("tool %s failed", call.name)
            error = ToolError(ToolErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}")
            result = ToolResult(text=tool_error_text(error), error=error)
        latency = (time.perf_counter() - start) * 1000
        log_event(
            log,
            10,
            "tool",
            name=call.name,
            ok=result.error is None,
            error=result.error.kind.value if result.error else None,
            ms=round(latency, 1),
        )
        return ToolResult(result.text, result.images, result.error, latency)

    def _run(self, call: ToolCall, images: Sequence[Image], deadline_s: float | None) -> ToolResult:
        spec = self._specs.get(call.name)
        if spec is None:
            raise ToolFailure(
                ToolErrorKind.UNKNOWN_TOOL,
                f"unknown tool {call.name!r}; available: {', '.join(self._specs)}",
            )
        try:
            arguments = json.loads(call.arguments_json) if call.arguments_json.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS, f"arguments are not valid JSON: {exc.msg}"
            ) from exc
        if not isinstance(arguments, dict):
            raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, "arguments must be a JSON object")
        problem = schema_problem(arguments, spec["function"]["parameters"])
        if problem is not None:
            raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, f"{call.name}: {problem}")
        if call.name == self.zoom.name:
            return self.zoom(arguments, images)
        if call.name == self.search.name:
            return self.search(arguments)
        assert self.python is not None
        return self.python(arguments, images, deadline_s)

    def close(self) -> None:
        if self.python is not None:
            self.python.close()
