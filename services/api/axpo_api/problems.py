"""Errors as RFC 9457 problem details (``application/problem+json``, :class:`Problem`), one
handler per kind of failure, with dotted field paths for invalid requests."""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from axpo.jobs import IdempotencyConflictError, JobNotFoundError, JobStateError
from axpo_client.models import FieldError, Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ApiProblem(Exception):
    """Raise to answer with a problem (auth, rate limit, a bad header)."""

    def __init__(
        self, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem_response(
    request_id: str | None,
    status: int,
    detail: str | None,
    *,
    instance: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    problem = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        request_id=request_id,
        errors=errors,
    )
    return JSONResponse(
        problem.model_dump(mode="json", exclude_none=True),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def dotted(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a dotted path; a body field loses the ``body`` prefix
    (``("body", "algorithm", "rho")`` -> ``algorithm.rho``), others keep where they came from
    (``query.limit``, ``header.Last-Event-ID``)."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or "(body)"


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            FieldError(loc=dotted(e.get("loc", ())), msg=str(e.get("msg", "")), type=str(e["type"]))
            for e in exc.errors()
        ]
        detail = "invalid request: " + "; ".join(f"{e.loc}: {e.msg}" for e in errors)
        return problem_response(
            _request_id(request), 422, detail, instance=request.url.path, errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(
            _request_id(request),
            exc.status_code,
            str(exc.detail),
            instance=request.url.path,
            headers=dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(ApiProblem)
    async def api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(
            _request_id(request),
            exc.status,
            exc.detail,
            instance=request.url.path,
            headers=exc.headers,
            errors=exc.extra.get("errors"),
        )

    @app.exception_handler(JobNotFoundError)
    async def not_found(request: Request, exc: JobNotFoundError) -> JSONResponse:
        return problem_response(_request_id(request), 404, str(exc), instance=request.url.path)

    @app.exception_handler(JobStateError)
    async def conflict(request: Request, exc: JobStateError) -> JSONResponse:
        return problem_response(_request_id(request), 409, str(exc), instance=request.url.path)

    @app.exception_handler(IdempotencyConflictError)
    async def idem_conflict(request: Request, exc: IdempotencyConflictError) -> JSONResponse:
        return problem_response(_request_id(request), 409, str(exc), instance=request.url.path)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return problem_response(
            _request_id(request),
            503,
            "the job store (Redis) is unreachable; retry shortly",
            instance=request.url.path,
            headers={"Retry-After": "1"},
        )


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: each status answered with a :class:`Problem`."""
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }
