"""Open a channel to an axpo service, and wait for it to be healthy.

:func:`open_channel` gives every caller the same behaviour:

- a default deadline (``settings.deadline_s``) on every call that sets none, so a hung server
  never hangs its caller; the deadline covers all attempts of a call, retries included;
- ``authorization: Bearer <token>`` metadata when ``settings.auth_token`` is set;
- ``settings.max_message_bytes`` as the largest message sent or received;
- gRPC's built-in retries, for UNAVAILABLE only (see :func:`open_channel`).
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from axpo.settings.base import RpcClientSettings

__all__ = ["ServiceUnavailableError", "open_channel", "retry_service_config", "wait_for_health"]

# Channel -> target, so errors can name what was dialled (a grpc.Channel does not expose it).
_TARGETS: weakref.WeakKeyDictionary[grpc.Channel, str] = weakref.WeakKeyDictionary()


class ServiceUnavailableError(RuntimeError):
    """A service did not report SERVING in time; the message names the target and last status."""


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.1s")."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


def retry_service_config(settings: RpcClientSettings) -> str:
    """The gRPC service config (JSON) carrying the retry policy that :func:`open_channel` uses."""
    policy = {
        "maxAttempts": settings.max_attempts,
        "initialBackoff": _duration(settings.initial_backoff_s),
        "maxBackoff": _duration(max(settings.max_backoff_s, settings.initial_backoff_s)),
        "backoffMultiplier": settings.backoff_multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    # "name": [{}] matches every method of every service on the channel. gRPC rejects the
    # whole config (every call fails INVALID_ARGUMENT) if maxAttempts < 2, so one attempt means
    # no retryPolicy at all.
    method_config: dict[str, Any] = {"name": [{}]}
    if settings.max_attempts >= 2:
        method_config["retryPolicy"] = policy
    return json.dumps({"methodConfig": [method_config]})


def open_channel(settings: RpcClientSettings) -> grpc.Channel:
    """An insecure channel to ``settings.target`` with the project's call policy.

    Retry policy (gRPC built-in retries, configured by a service config):

    - Retried: UNAVAILABLE only. It almost always means no handler ran the call (connection
      refused or reset, server already shutting down, or a handler that aborts with
      UNAVAILABLE to say "try again"), so running it again does not do the work twice. The
      exception: a call still running when a server's shutdown grace period ends is cancelled
      and its caller sees UNAVAILABLE although the handler ran (and may still be running), so
      servers should only be given methods that tolerate a repeat (axpo's are pure functions
      of the request, or keyed by ids).
    - Attempts: at most ``max_attempts`` per call, the first included (gRPC caps this at 5).
    - Backoff: exponential with jitter; the n-th retry waits about min(initial_backoff_s *
      backoff_multiplier ** (n-1), max_backoff_s), randomized so callers do not retry in step.
    - Deadline: one deadline covers the call and all its retries; no retry starts after it.
    - Not retried: DEADLINE_EXCEEDED (the server may have done the work, or still be doing it;
      a retry could double it and would have no time left anyway); CANCELLED (the caller gave
      up); INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNAUTHENTICATED,
      PERMISSION_DENIED, UNIMPLEMENTED, RESOURCE_EXHAUSTED (the same request fails the same
      way again); INTERNAL, UNKNOWN (a server bug or crash mid-call: the work may have
      happened). Callers that know a call is idempotent may retry those themselves.
    - Also not retried, by gRPC itself: a call once the server has sent response headers or
      messages (the attempt is committed), and a call whose request messages outgrow the
      per-call retry buffer (``grpc.per_rpc_retry_buffer_size``, 256 KiB by default).

    Every call gets ``settings.deadline_s`` as its timeout unless it passes its own, and the
    bearer token when ``settings.auth_token`` is set. Close the channel when done.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(settings)),
        # Use our service config even if a DNS TXT record offers another.
        ("grpc.service_config_disable_resolution", 1),
    ]
    raw = grpc.insecure_channel(settings.target, options=options)
    _register_methods(raw)
    channel = grpc.intercept_channel(
        raw, _CallDefaultsInterceptor(settings.deadline_s, settings.auth_token)
    )
    _TARGETS[channel] = settings.target
    return channel


def _register_methods(raw: grpc.Channel) -> None:
    """Register every axpo and health method on ``raw`` now, before any call.

    Workaround (grpcio 1.85): through ``grpc.intercept_channel`` a generated stub's method is
    registered with the C core on its first call (``Channel._get_registered_call_handle``),
    which reads the channel's C pointer without a lock or a closed check. A first call that
    races ``close()`` (a rollout worker cancels its questions in flight by closing its
    channels) segfaults the process: rc 139, no Python traceback (seen in CI: a deployment's
    rollout worker restarted twice with SIGSEGV). Registered beforehand, such a call raises
    ValueError ("Cannot invoke RPC on closed channel!") like any call after a close.
    ``tests/integration/test_rpc_helpers.py`` runs the crash in a subprocess."""
    import importlib

    for module in _SERVICE_MODULES:
        descriptor = importlib.import_module(module).DESCRIPTOR
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                kind = (method.client_streaming, method.server_streaming)
                make: Any = {
                    (False, False): raw.unary_unary,
                    (False, True): raw.unary_stream,
                    (True, False): raw.stream_unary,
                    (True, True): raw.stream_stream,
                }[kind]
                make(path, _registered_method=True)


_SERVICE_MODULES = (
    "axpo.v1.inference_pb2",
    "axpo.v1.tools_pb2",
    "axpo.v1.verifier_pb2",
    "axpo.v1.learner_pb2",
    "grpc_health.v1.health_pb2",
)
"""The modules whose services :func:`_register_methods` registers on every channel."""


def wait_for_health(channel: grpc.Channel, timeout_s: float, service: str = "") -> None:
    """Poll the standard health ``Check`` until ``service`` (``""``: the whole server) is
    SERVING. Raises ServiceUnavailableError after ``timeout_s`` naming the target and the last
    status or error seen."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    pause = 0.02
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            response = stub.Check(request, timeout=min(remaining, 1.0))
        except grpc.RpcError as exc:
            last = _describe_error(exc)
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(pause * 2, 0.25)
    target = _TARGETS.get(channel, "the channel's target")
    what = f"service {service!r}" if service else "server"
    raise ServiceUnavailableError(
        f"{target}: {what} not SERVING after {timeout_s:g} s (last: {last})"
    )


def _describe_error(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    name = code.name if code is not None else type(exc).__name__
    return f"{name}: {details}" if details else name


# --------------------------------------------------------------------------- interceptor


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    """grpc.ClientCallDetails is abstract with no constructor; this is the usual concrete one."""


class _CallDefaultsInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the default deadline and the bearer token to every call."""

    def __init__(self, deadline_s: float, auth_token: str | None) -> None:
        self._deadline_s = deadline_s
        self._auth = ("authorization", f"Bearer {auth_token}") if auth_token else None

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ())
        if self._auth is not None and not any(k == "authorization" for k, _ in metadata):
            metadata.append(self._auth)
        return _ClientCallDetails(
            method=details.method,
            timeout=self._deadline_s if details.timeout is None else details.timeout,
            metadata=tuple(metadata) or None,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
            compression=details.compression,
        )

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[Any]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[Any]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)
