"""The agent loop's :class:`~axpo_rollout.agent.Backend` over gRPC: the inference service,
the tool server and the verifier, each through :func:`axpo.rpc.client.open_channel` (default
deadlines, retries on UNAVAILABLE only).

Images go to the inference service and the tool server with their bytes on every call (the
services are stateless; the inference service caches decoded images by hash)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from axpo.contracts import convert
from axpo.contracts.domain import (
    Image,
    Reward,
    RewardWeights,
    Sample,
    SamplingParams,
    ScoreItem,
    ToolCall,
    ToolError,
    ToolErrorKind,
    ToolResult,
    ToolSpec,
)
from axpo.rpc.client import ServiceUnavailableError, open_channel, wait_for_health
from axpo.settings.base import RpcClientSettings
from axpo.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from axpo_rollout.agent import Cancelled, CancelToken, PromptTooLongError

UNREACHABLE: tuple[type[Exception], ...] = (ServiceUnavailableError, grpc.RpcError)
"""What :meth:`GrpcBackend.wait_ready` and :meth:`GrpcBackend.list_tools` raise when a service
is not there (yet): callers outside the gRPC edge catch these without importing grpc."""


class GrpcBackend:
    """Channels to the three services; close when done."""

    def __init__(
        self,
        inference: RpcClientSettings,
        tools: RpcClientSettings,
        verifier: RpcClientSettings,
    ) -> None:
        self._channels = [open_channel(s) for s in (inference, tools, verifier)]
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channels[0])
        self.tools = tools_pb2_grpc.ToolServiceStub(self._channels[1])
        self.verifier = verifier_pb2_grpc.VerifierServiceStub(self._channels[2])

    def wait_ready(self, timeout_s: float) -> None:
        for channel in self._channels:
            wait_for_health(channel, timeout_s)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    # ------------------------------------------------------------------- Backend

    def generate(
        self,
        prompt: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        request = inference_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=list(prompt),
            images=[convert.image_to_proto(i) for i in images],
            sampling=convert.sampling_params_to_proto(sampling),
        )
        return _samples(self.inference.Generate, request, cancel)

    def resume(
        self,
        prompt: Sequence[int],
        prefix: Sequence[int],
        images: Sequence[Image],
        sampling: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Sample]:
        request = inference_pb2.ResumeFromPrefixRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=list(prompt),
            prefix_token_ids=list(prefix),
            images=[convert.image_to_proto(i) for i in images],
            sampling=convert.sampling_params_to_proto(sampling),
        )
        return _samples(self.inference.ResumeFromPrefix, request, cancel)

    def call_tool(self, call: ToolCall, images: Sequence[Image], timeout_s: float) -> ToolResult:
        request = tools_pb2.CallRequest(
            call=convert.tool_call_to_proto(call),
            images=[convert.image_to_proto(i) for i in images],
            deadline_ms=int(timeout_s * 1000),
        )
        try:
            reply = self.tools.Call(request, timeout=timeout_s + 5.0)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,):
                return ToolResult(error=ToolError(ToolErrorKind.TIMEOUT, "tool call timed out"))
            raise
        return convert.tool_result_from_proto(reply.result)

    def list_tools(self) -> list[ToolSpec]:
        reply = self.tools.ListTools(tools_pb2.ListToolsRequest())
        return [convert.tool_spec_from_proto(t) for t in reply.tools]

    def score(self, items: Sequence[ScoreItem], weights: RewardWeights) -> list[Reward]:
        request = verifier_pb2.ScoreRequest(
            items=[convert.score_item_to_proto(i) for i in items],
            weights=convert.reward_weights_to_proto(weights),
        )
        reply = self.verifier.Score(request)
        by_id = {r.item_id: convert.reward_from_proto(r.reward) for r in reply.results}
        missing = [i.item_id for i in items if i.item_id not in by_id]
        if missing:
            raise RuntimeError(f"verifier returned no score for items {missing}")
        return [by_id[i.item_id] for i in items]


def _samples(rpc: Any, request: Any, cancel: CancelToken | None = None) -> list[Sample]:
    """Call Generate or ResumeFromPrefix; a prompt over the context is PromptTooLongError.
    With ``cancel``: the call is cancelled when it fires (the inference service then aborts
    the request in vLLM) and :class:`Cancelled` is raised."""
    try:
        if cancel is None:
            reply = rpc(request)
        else:
            call = rpc.future(request)
            cancel.on_cancel(call.cancel)
            reply = call.result()
    except grpc.FutureCancelledError as exc:
        raise Cancelled(f"request {request.request_id} cancelled") from exc
    except grpc.RpcError as exc:
        if cancel is not None and cancel.cancelled and exc.code() == grpc.StatusCode.CANCELLED:
            raise Cancelled(f"request {request.request_id} cancelled") from exc
        raise _too_long(exc) from exc
    return [convert.sample_from_proto(s) for s in reply.samples]


def _too_long(exc: grpc.RpcError) -> Exception:
    """INVALID_ARGUMENT about the context length becomes PromptTooLongError (the rollout ends
    truncated); anything else is re-raised as is."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and (
        "max_model_len" in details or "too long" in details or "context" in details
    ):
        return PromptTooLongError(details)
    return exc
