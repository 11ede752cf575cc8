"""Start a gRPC service the way every axpo service starts.

:func:`start_server` builds a ``grpc.server`` with

- a thread pool of ``settings.max_workers``;
- ``settings.max_message_bytes`` as the largest message received or sent (a larger request
  fails with RESOURCE_EXHAUSTED, and the server goes on serving);
- a request-logging interceptor (one line per RPC: method, status code, latency in ms);
- a bearer-token interceptor when ``settings.auth_token`` is set (health and reflection stay
  open, so probes and grpcurl ``list`` need no token);
- the standard health service (``grpc.health.v1.Health``): ``""`` and every registered service
  SERVING while up, NOT_SERVING once shutdown begins;
- server reflection when ``settings.reflection``.

:func:`serve_forever` blocks until SIGTERM or SIGINT, then shuts down gracefully.
"""

from __future__ import annotations

import functools
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from axpo.settings.base import RpcServerSettings
from axpo.telemetry.logs import get_logger, log_event

__all__ = [
    "RunningServer",
    "ServiceRegistration",
    "serve_forever",
    "serve_while",
    "start_server",
]

_LOG = get_logger(__name__)

HEALTH_SERVICE: str = health.SERVICE_NAME
"""``grpc.health.v1.Health``"""
REFLECTION_SERVICE: str = reflection.SERVICE_NAME
"""``grpc.reflection.v1alpha.ServerReflection``"""

# Methods reachable without a token: health probes and reflection (both versions, in case a
# newer grpcio-reflection registers v1 too).
_OPEN_METHOD_PREFIXES = (
    f"/{HEALTH_SERVICE}/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

if TYPE_CHECKING:  # grpc's classes are generic only in the type stubs
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], _Handler | None]


@dataclass
class ServiceRegistration:
    """One service to serve.

    >>> ServiceRegistration(
    ...     name="axpo.v1.VerifierService",
    ...     add=lambda server: add_VerifierServiceServicer_to_server(servicer, server),
    ... )  # doctest: +SKIP
    """

    name: str
    """Full service name as in the proto, e.g. ``axpo.v1.VerifierService``."""
    add: Callable[[grpc.Server], None]
    """Adds the servicer to a server (a closure calling ``add_XServicer_to_server``)."""


@dataclass
class RunningServer:
    """A started server. ``stop()`` is safe to call more than once."""

    server: grpc.Server
    health: health.HealthServicer
    host: str
    port: int
    services: tuple[str, ...]
    _executor: futures.ThreadPoolExecutor = field(repr=False)

    @property
    def address(self) -> str:
        """``host:port`` as bound (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Set every health status to NOT_SERVING, stop accepting RPCs, and give in-flight RPCs
        ``grace`` seconds to finish (``None``: cancel them now). Returns once stopped."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` passed first."""
        return not self.server.wait_for_termination(timeout)


def start_server(
    registrations: Sequence[ServiceRegistration],
    settings: RpcServerSettings,
    *,
    service: str,
) -> RunningServer:
    """Start serving ``registrations`` on ``settings.host:settings.port``.

    ``service`` is the short name used in logs and thread names (``verifier``). Port 0 picks a
    free port; the bound one is ``RunningServer.port``. Raises RuntimeError if the address
    cannot be bound (the port is not shared with another process: SO_REUSEPORT is off).
    """
    names = [r.name for r in registrations]
    if len(set(names)) != len(names):
        raise ValueError(f"service registered twice: {names}")

    interceptors: list[grpc.ServerInterceptor] = []
    if settings.log_requests:  # outermost, so rejected calls are logged too
        interceptors.append(_LoggingInterceptor())
    if settings.auth_token:
        interceptors.append(_AuthInterceptor(settings.auth_token))
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Without this two servers can bind the same fixed port and split its traffic.
        ("grpc.so_reuseport", 0),
    ]
    executor = futures.ThreadPoolExecutor(
        max_workers=settings.max_workers, thread_name_prefix=f"{service}-rpc"
    )
    server = grpc.server(executor, interceptors=interceptors, options=options)
    try:
        for registration in registrations:
            registration.add(server)
        health_servicer = health.HealthServicer()
        for name in ("", *names):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (*names, HEALTH_SERVICE, REFLECTION_SERVICE), server
            )
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        port = server.add_insecure_port(f"{host}:{settings.port}")
        if port == 0:  # older grpcio returned 0 instead of raising
            raise RuntimeError(f"cannot bind {host}:{settings.port}")
        server.start()
    except BaseException:
        server.stop(None)
        executor.shutdown(wait=False)
        raise
    running = RunningServer(
        server=server,
        health=health_servicer,
        host=settings.host,
        port=port,
        services=tuple(names),
        _executor=executor,
    )
    log_event(_LOG, logging.DEBUG, "started", address=running.address, services=",".join(names))
    return running


def serve_forever(running: RunningServer, grace_s: float) -> None:
    """Log ``listening``, then block until the server stops.

    In the main thread, SIGTERM and SIGINT start a graceful shutdown: health goes NOT_SERVING,
    new RPCs are refused, in-flight RPCs get ``grace_s`` seconds, then are cancelled. A second
    signal cancels them at once. The previous signal handlers are restored on return. Off the
    main thread no handler is installed; it just blocks until someone calls ``running.stop``.
    """
    requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if requested.is_set():
            log_event(_LOG, logging.WARNING, "second signal: cancelling in-flight RPCs")
            running.server.stop(0)
        else:
            log_event(
                _LOG,
                logging.INFO,
                "shutting down",
                signal=signal.Signals(signum).name,
                grace_s=grace_s,
            )
        requested.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        log_event(
            _LOG,
            logging.INFO,
            "listening",
            address=running.address,
            services=",".join(running.services),
        )
        # Poll so that a signal is handled promptly and an external stop() also ends the loop.
        while not requested.is_set():
            if running.wait(timeout=0.2):
                break
        if requested.is_set():
            running.stop(grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log_event(_LOG, logging.INFO, "stopped", address=running.address)


def serve_while(
    running: RunningServer,
    work: Callable[[], None],
    stop: Callable[[], None],
    *,
    grace_s: float,
    name: str,
    port_file: Path | None = None,
) -> None:
    """A service whose work runs beside its gRPC server (the learner's loop, a rollout
    worker): ``work`` runs in a thread named ``name`` while this thread serves
    (:func:`serve_forever`, writing the bound port to ``port_file`` first). When ``work``
    returns or raises, the server stops; when the server stops first (SIGTERM, SIGINT),
    ``stop()`` asks ``work`` to end and this waits for it. An exception of ``work`` is logged
    and raised again as RuntimeError (a non-zero exit, for a supervisor to restart)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - raised again below, in the caller's thread
            failure.append(exc)
            _LOG.exception("%s failed", name)
        finally:
            running.stop(grace_s)  # ends serve_forever below

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if port_file is not None:
        port_file.write_text(f"{running.port}\n")
    try:
        serve_forever(running, grace_s)
    finally:
        stop()
        thread.join()
    if failure:
        raise RuntimeError(f"{name} failed: {failure[0]}") from failure[0]


# --------------------------------------------------------------------------- interceptors


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None


def _replace_behavior(handler: _Handler, wrap: Callable[[Any, bool], Any]) -> _Handler:
    """A copy of ``handler`` whose behaviour is ``wrap(behavior, response_streaming)``."""
    shapes: tuple[tuple[Callable[..., _Handler], Callable[..., Any] | None], ...] = (
        (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    )
    make, behavior = next((m, b) for m, b in shapes if b is not None)
    return make(
        wrap(behavior, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _AuthInterceptor(grpc.ServerInterceptor):
    """Rejects RPCs without ``authorization: Bearer <token>`` (except health and reflection)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        method = handler_call_details.method
        if method.startswith(_OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        presented = _metadata_value(handler_call_details.invocation_metadata, "authorization")
        if presented is not None and hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        if presented is None:
            message = f"{method}: missing 'authorization: Bearer <token>' metadata"
        else:
            message = f"{method}: invalid bearer token"
        # Same shape as the real handler, so streaming clients get a proper status; an unknown
        # method is rejected the same way, so it does not reveal what exists.
        handler = continuation(handler_call_details)

        def reject(behavior: Any, response_streaming: bool) -> Callable[..., Any]:
            def rejected(request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return rejected

        if handler is None:
            return grpc.unary_unary_rpc_method_handler(reject(None, False))
        return _replace_behavior(handler, reject)


def _final_status(context: grpc.ServicerContext, raised: bool) -> tuple[grpc.StatusCode, str]:
    """The status the call ends with, read back from the context after the behaviour ran.

    ``set_code``/``abort`` store the code on the context (``code()``/``details()`` exist at
    runtime though the type stubs omit them). An exception without a code becomes UNKNOWN;
    a call the client dropped (deadline or cancel) is no longer active.
    """
    code: grpc.StatusCode | None = getattr(context, "code", lambda: None)()
    raw = getattr(context, "details", lambda: None)()
    details = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
    if code is None:
        if not context.is_active():
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        elif raised:
            code = grpc.StatusCode.UNKNOWN
        else:
            code = grpc.StatusCode.OK
    return code, details


class _LoggingInterceptor(grpc.ServerInterceptor):
    """One log line per RPC: ``rpc method=... code=... ms=...``.

    INFO when OK, WARNING otherwise; health and reflection calls that succeed go to DEBUG so
    probes do not flood the log.
    """

    def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        start = time.perf_counter()
        method = handler_call_details.method
        quiet = method.startswith(_OPEN_METHOD_PREFIXES)

        def finish(context: grpc.ServicerContext | None, raised: bool) -> None:
            if context is None:
                code, details = grpc.StatusCode.UNIMPLEMENTED, "method not found"
            else:
                code, details = _final_status(context, raised)
            ms = round((time.perf_counter() - start) * 1000, 1)
            if code is grpc.StatusCode.OK:
                level = logging.DEBUG if quiet else logging.INFO
                log_event(_LOG, level, "rpc", method=method, code=code.name, ms=ms)
            else:
                log_event(
                    _LOG,
                    logging.WARNING,
                    "rpc",
                    method=method,
                    code=code.name,
                    ms=ms,
                    details=details[:200],
                )

        handler = continuation(handler_call_details)
        if handler is None:
            finish(None, True)
            return None
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if getattr(behavior, "experimental_non_blocking", False):
            # Callback-style behaviours (health Watch) answer through a send_response callback
            # after returning; wrapping them would change how grpc calls them. Leave them be.
            return handler

        def observe(behavior: Any, response_streaming: bool) -> Callable[..., Any]:
            @functools.wraps(behavior)
            def observed(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    result = behavior(request, context)
                except BaseException:
                    finish(context, True)
                    raise
                if response_streaming:
                    return _observe_stream(result, context, finish)
                finish(context, False)
                return result

            return observed

        return _replace_behavior(handler, observe)


def _observe_stream(
    responses: Iterator[Any],
    context: grpc.ServicerContext,
    finish: Callable[[grpc.ServicerContext, bool], None],
) -> Iterator[Any]:
    raised = True
    try:
        yield from responses
        raised = False
    finally:  # also on GeneratorExit, when grpc drops a stream the client cancelled
        finish(context, raised)
