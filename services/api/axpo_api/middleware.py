"""Pure-ASGI middleware (no buffering, so SSE streams pass through): a request id on every
response and log line, one log line per request, the body size cap, and a problem response
for unexpected errors."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from axpo.telemetry.logs import get_logger, log_event
from axpo_api.problems import problem_response

_log = get_logger("axpo_api.requests")
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
REQUEST_ID_HEADER = "x-request-id"


class BodyTooLarge(Exception):
    """A request body grew past ``max_body_bytes`` while it was read (answered with 413)."""


class RequestContext:
    """Outermost layer: takes ``X-Request-ID`` from the request when it is sane (so a caller's
    id follows the request through the logs) or makes one, puts it on the response, logs the
    request, caps the body at ``max_body_bytes`` (413), and turns an unhandled exception into
    a 500 problem that carries the request id."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_done: Any = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 0
        started = False
        answered = False  # our own 413 went out: whatever the app sends after is dropped
        too_large = f"request body larger than {self.max_body_bytes} bytes"

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                ]
            await send(message)

        received = 0

        async def capped_receive() -> Message:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Answered here: the app turns any error while reading the body into 400.
                    if not started:
                        response = problem_response(request_id, 413, too_large)
                        await response(scope, receive, send_with_id)
                        answered = True
                    raise BodyTooLarge
            return message

        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise BodyTooLarge
            await self.app(scope, capped_receive, send_with_id)
        except BodyTooLarge:
            if not started:
                await problem_response(request_id, 413, too_large)(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - answered as a 500 problem and logged
            _log.exception("unhandled error request_id=%s", request_id)
            if not started:
                detail = f"internal error; quote request id {request_id}"
                await problem_response(request_id, 500, detail)(scope, receive, send_with_id)
        finally:
            elapsed_ms = (time.perf_counter() - start) * 1000
            route = scope.get("route")
            log_event(
                _log,
                logging.INFO,
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                ms=round(elapsed_ms, 2),
                request_id=request_id,
                token=scope.get("state", {}).get("token"),
            )
            if self.on_done is not None:
                path = getattr(route, "path", None) or "unmatched"
                self.on_done(scope["method"], path, status, elapsed_ms / 1000)
