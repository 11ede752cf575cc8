"""gRPC front of the inference service: the only module of the service that touches gRPC.

``axpo serve inference`` runs :func:`serve`. Requests become domain types and engine calls;
InvalidRequestError → INVALID_ARGUMENT, PreconditionError → FAILED_PRECONDITION,
EngineDeadError → UNAVAILABLE, each with the engine's message (it names the field).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, TypeVar

import grpc

from axpo.contracts import convert
from axpo.rpc.server import RunningServer, ServiceRegistration, serve_forever, start_server
from axpo.settings.inference import InferenceSettings
from axpo.telemetry.logs import configure_logging, get_logger
from axpo.v1 import inference_pb2, inference_pb2_grpc
from axpo_inference.engine import GenerationResult, InferenceEngine
from axpo_inference.errors import EngineDeadError, InvalidRequestError, PreconditionError

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
log = get_logger("axpo.inference")
T = TypeVar("T")


def _guard(
    context: grpc.ServicerContext, fn: Callable[[], T], on_dead: Callable[[], None] = lambda: None
) -> T:
    try:
        return fn()
    except InvalidRequestError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except PreconditionError as exc:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except EngineDeadError as exc:
        on_dead()  # health goes NOT_SERVING so orchestrators replace the replica
        context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise AssertionError("unreachable")  # context.abort raises


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine) -> None:
        self._engine = engine
        # Set by start() once the server (and its health service) exists.
        self.on_engine_dead: Callable[[], None] = lambda: None

    def _guard(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        return _guard(context, fn, self.on_engine_dead)

    def _run(
        self,
        request: inference_pb2.GenerateRequest | inference_pb2.ResumeFromPrefixRequest,
        prefix: list[int],
        context: grpc.ServicerContext,
    ) -> dict[str, Any]:
        """Run a Generate or ResumeFromPrefix request (``prefix``: the frozen prefix, empty for
        Generate); returns the fields their responses share."""
        request_id = request.request_id
        sampling = request.sampling
        if not sampling.top_p >= 0:  # the converter reads 0 as "off" (1.0); negatives are errors
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sampling.top_p: {sampling.top_p} outside (0, 1] (0 means 1.0)",
            )
        params = convert.sampling_params_from_proto(sampling)

        def run() -> GenerationResult:
            future = self._engine.submit(
                list(request.prompt_token_ids),
                [convert.image_from_proto(i) for i in request.images],
                params,
                prefix_ids=prefix,
                request_id=request_id,
            )
            # Called when the RPC ends, also when the client cancels it or its deadline
            # passes: the request is then aborted in vLLM instead of running on for nobody.
            context.add_callback(future.cancel)
            return future.result()

        try:
            result = self._guard(context, run)
        except CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, f"request {request_id}: cancelled")
            raise AssertionError("unreachable") from None
        return {
            "samples": [convert.sample_to_proto(s) for s in result.samples],
            "prompt_tokens": result.prompt_tokens,
            "cached_prompt_tokens": result.cached_prompt_tokens,
        }

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        return inference_pb2.GenerateResponse(**self._run(request, [], context))

    def ResumeFromPrefix(
        self, request: inference_pb2.ResumeFromPrefixRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ResumeFromPrefixResponse:
        return inference_pb2.ResumeFromPrefixResponse(
            **self._run(request, list(request.prefix_token_ids), context)
        )

    def LoadWeights(
        self, request: inference_pb2.LoadWeightsRequest, context: grpc.ServicerContext
    ) -> inference_pb2.LoadWeightsResponse:
        if not request.path:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path: empty")
        result = self._guard(
            context,
            lambda: self._engine.load_weights_from_path(request.path, request.policy_version),
        )
        return inference_pb2.LoadWeightsResponse(
            policy_version=result.policy_version,
            tensors_loaded=result.tensors_loaded,
            load_ms=result.load_ms,
        )

    def LoadWeightsStream(
        self,
        request_iterator: Iterator[inference_pb2.LoadWeightsStreamRequest],
        context: grpc.ServicerContext,
    ) -> inference_pb2.LoadWeightsStreamResponse:
        started = time.perf_counter()
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("item") != "header":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "header: the stream must start with a header"
            )
        header = first.header
        assembler = self._guard(
            context,
            lambda: self._engine.stream_assembler(header.policy_version, header.tensor_count),
        )

        def assemble() -> Path:
            for i, msg in enumerate(request_iterator, start=1):
                if msg.WhichOneof("item") != "chunk":
                    raise InvalidRequestError(f"item {i}: a second header (only chunks follow)")
                c = msg.chunk
                assembler.add(c.name, c.dtype, c.shape, c.offset, c.data, c.total_bytes)
            return assembler.finish()

        folder = self._guard(context, assemble)
        try:
            result = self._guard(
                context, lambda: self._engine.load_weights_from_path(folder, header.policy_version)
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return inference_pb2.LoadWeightsStreamResponse(
            policy_version=result.policy_version,
            tensors_loaded=result.tensors_loaded,
            load_ms=(time.perf_counter() - started) * 1000,
            bytes_received=assembler.bytes_received,
        )

    def Status(
        self, request: inference_pb2.InferenceServiceStatusRequest, context: grpc.ServicerContext
    ) -> inference_pb2.InferenceServiceStatusResponse:
        st = self._guard(context, self._engine.status)
        return inference_pb2.InferenceServiceStatusResponse(
            model=st.model,
            backend=st.backend,
            policy_version=st.policy_version,
            queue_depth=st.queue_depth,
            kv_cache_usage=st.kv_cache_usage,
            max_model_len=st.max_model_len,
            max_n=st.max_n,
        )


def start(settings: InferenceSettings, engine: InferenceEngine) -> RunningServer:
    """Start the service (non-blocking); the caller owns ``engine`` and stops the server."""
    servicer = InferenceServicer(engine)
    registration = ServiceRegistration(
        name=SERVICE_NAME,
        add=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            servicer, server
        ),
    )
    running = start_server([registration], settings.rpc, service="inference")

    def mark_dead() -> None:
        log.error("inference engine died; health set to NOT_SERVING")
        running.health.enter_graceful_shutdown()

    servicer.on_engine_dead = mark_dead
    return running


def serve(settings: InferenceSettings, port_file: Path | None = None) -> None:
    """Start the engine, then serve until SIGTERM/SIGINT. Writes the bound port to
    ``port_file`` once the engine is up (so a port file means the service is ready)."""
    configure_logging(settings.log, service="inference")
    with InferenceEngine(settings) as engine:
        running = start(settings, engine)
        if port_file is not None:
            port_file.write_text(f"{running.port}\n")
        serve_forever(running, settings.rpc.grace_s)
