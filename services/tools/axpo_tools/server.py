"""gRPC front of the tool server: the only module of the service that touches gRPC.

Admission: at most ``max_concurrency`` calls run at once; up to ``max_queue`` more wait (each
no longer than its deadline); beyond that a call is refused with RESOURCE_EXHAUSTED so the
caller can back off or go to another replica. The server keeps no state between calls, so
replicas scale horizontally.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from axpo.contracts import convert
from axpo.contracts.domain import ToolError, ToolErrorKind, ToolResult
from axpo.rpc.server import RunningServer, ServiceRegistration, serve_forever, start_server
from axpo.settings.tools import ToolsSettings
from axpo.telemetry.logs import configure_logging
from axpo.v1 import tools_pb2, tools_pb2_grpc
from axpo_tools.toolbox import Toolbox

SERVICE_NAME = tools_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name


class Admission:
    """A counting gate with a bounded waiting room."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self._slots = threading.BoundedSemaphore(concurrency)
        self._queue = queue
        self._waiting = 0
        self._lock = threading.Lock()

    def enter(self, timeout_s: float) -> bool | None:
        """True: admitted (call ``leave``); False: waited ``timeout_s`` in vain; None: the
        waiting room is full."""
        if self._slots.acquire(blocking=False):
            return True
        with self._lock:
            if self._waiting >= self._queue:
                return None
            self._waiting += 1
        try:
            return self._slots.acquire(timeout=max(0.0, timeout_s))
        finally:
            with self._lock:
                self._waiting -= 1

    def leave(self) -> None:
        self._slots.release()


class ToolServicer(tools_pb2_grpc.ToolServiceServicer):
    def __init__(self, toolbox: Toolbox, settings: ToolsSettings) -> None:
        self._toolbox = toolbox
        self._settings = settings
        self._admission = Admission(settings.max_concurrency, settings.max_queue)

    def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.ServicerContext
    ) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(
            tools=[convert.tool_spec_to_proto(s) for s in self._toolbox.specs()]
        )

    def Call(
        self, request: tools_pb2.CallRequest, context: grpc.ServicerContext
    ) -> tools_pb2.CallResponse:
        budget = self._settings.default_deadline_s
        if request.deadline_ms:
            budget = min(budget, request.deadline_ms / 1000)
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        admitted = self._admission.enter(budget)
        if admitted is None:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tool server busy: {self._settings.max_queue} calls already waiting",
            )
        if not admitted:
            error = ToolError(
                ToolErrorKind.TIMEOUT,
                f"deadline of {budget:.1f} s passed while waiting for a free slot",
            )
            result = ToolResult(text=f"Error (timeout): {error.message}", error=error)
            return tools_pb2.CallResponse(result=convert.tool_result_to_proto(result))
        try:
            left = budget
            remaining = context.time_remaining()
            if remaining is not None:
                left = min(left, remaining)
            result = self._toolbox.call(
                convert.tool_call_from_proto(request.call),
                [convert.image_from_proto(i) for i in request.images],
                deadline_s=left,
            )
        finally:
            self._admission.leave()
        return tools_pb2.CallResponse(result=convert.tool_result_to_proto(result))


def start(settings: ToolsSettings, toolbox: Toolbox) -> RunningServer:
    """Start the service (non-blocking); the caller owns ``toolbox`` and stops the server."""
    servicer = ToolServicer(toolbox, settings)
    # Every admitted or waiting call holds a thread, plus a few for health and ListTools.
    workers = settings.max_concurrency + settings.max_queue + 4
    rpc = settings.rpc.model_copy(update={"max_workers": max(settings.rpc.max_workers, workers)})
    registration = ServiceRegistration(
        name=SERVICE_NAME,
        add=lambda server: tools_pb2_grpc.add_ToolServiceServicer_to_server(servicer, server),
    )
    return start_server([registration], rpc, service="tools")


def serve(settings: ToolsSettings, port_file: Path | None = None) -> None:
    """Run the tool server until SIGTERM/SIGINT. Writes the bound port to ``port_file``."""
    configure_logging(settings.log, service="tools")
    toolbox = Toolbox(settings)
    try:
        toolbox.start()
        running = start(settings, toolbox)
        if port_file is not None:
            port_file.write_text(f"{running.port}\n")
        serve_forever(running, settings.rpc.grace_s)
    finally:
        toolbox.close()
