"""Typed errors of the client: one class per kind of answer a caller handles differently."""

from __future__ import annotations

from axpo_client.models import FieldError, Problem


class ApiError(Exception):
    """The api answered with an error (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, message: str, problem: Problem | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem

    @property
    def request_id(self) -> str | None:
        return self.problem.request_id if self.problem else None


class AuthError(ApiError):
    """401 (no token) or 403 (a token the api does not accept): check AXPO_API_TOKEN."""


class ValidationError(ApiError):
    """422: the request (a job spec) is invalid; ``fields`` lists every bad field."""

    @property
    def fields(self) -> list[FieldError]:
        return list(self.problem.errors or []) if self.problem else []


class NotFound(ApiError):
    """404: no such job."""


class Conflict(ApiError):
    """409: the job's state does not allow this (cancelling a finished job), or an
    idempotency key reused with another spec."""


def error_for(status: int, body: bytes, content_type: str) -> ApiError:
    """The typed error for an error response."""
    problem: Problem | None = None
    if "json" in content_type:
        try:
            problem = Problem.model_validate_json(body)
        except ValueError:
            problem = None
    if problem is not None:
        message = f"{status} {problem.title}: {problem.detail or ''}".rstrip(": ")
        if problem.errors:
            message += "".join(f"\n  {e.loc}: {e.msg}" for e in problem.errors)
    else:
        message = f"{status}: {body[:500].decode(errors='replace')}"
    cls: type[ApiError] = ApiError
    if status in (401, 403):
        cls = AuthError
    elif status == 422:
        cls = ValidationError
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    return cls(status, message, problem)
