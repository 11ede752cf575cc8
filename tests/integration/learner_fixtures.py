"""Tiny text-only groups for learner tests, the tiny model they train (built once), and a
recording inference replica that weights are published to."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from axpo.contracts.domain import Group, Reward, Trajectory
from axpo.rpc.server import ServiceRegistration, start_server
from axpo.settings.base import RpcClientSettings, RpcServerSettings
from axpo.study.tiny_model import build_tiny_model
from axpo.v1 import inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-learner") / "model", seed=0)


def text_group(gid: str, *, size: int = 4, version: int = 0) -> Group:
    """A group of ``size`` short rollouts (6 prompt tokens, 4 to 11 generated), half correct,
    token ids inside the tiny model's vocabulary."""
    rng = random.Random(gid)
    prompt = [rng.randrange(10, 900) for _ in range(6)]
    trajs = []
    for i in range(size):
        gen = [rng.randrange(10, 900) for _ in range(rng.randrange(4, 12))]
        ids = tuple(prompt + gen)
        trajs.append(
            Trajectory(
                trajectory_id=f"{gid}/{i}",
                token_ids=ids,
                loss_mask=(False,) * len(prompt) + (True,) * len(gen),
                logprobs=tuple(-7.0 for _ in ids),
                entropies=(0.0,) * len(ids),
                segments=(),
                prompt_length=len(prompt),
                reward=Reward.zero("x") if i % 2 else Reward(1.0, True, 1, 0, 0, "a", "", ""),
            )
        )
    return Group(gid, f"q-{gid}", tuple(trajs), policy_version=version)


class RecordingInference(inference_pb2_grpc.InferenceServiceServicer):
    """A fake replica: applies the inference engine's own weight checks
    (``axpo_inference.checkpoint``: ``check_weights`` on the file's headers for LoadWeights,
    ``WeightStreamAssembler`` for the stream, and a version that must increase) against the
    checkpoint it serves, then records what it got. Status reports the serving version."""

    def __init__(self, checkpoint: Path, version: int = 0) -> None:
        from axpo_inference.checkpoint import read_safetensors_specs

        self.expected = read_safetensors_specs(checkpoint)
        self.version = version
        self.loaded: list[tuple[int, dict[str, torch.Tensor]]] = []

    def _apply(self, path: Path, version: int, context: Any) -> None:
        from safetensors.torch import load_file

        from axpo_inference.checkpoint import check_weights, read_safetensors_specs
        from axpo_inference.errors import InvalidRequestError

        try:
            check_weights(self.expected, read_safetensors_specs(path))
        except InvalidRequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if version <= self.version:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stale version")
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        self.version = version
        self.loaded.append((version, tensors))

    def LoadWeights(self, request, context):
        self._apply(Path(request.path), request.policy_version, context)
        return inference_pb2.LoadWeightsResponse(
            policy_version=self.version, tensors_loaded=len(self.loaded[-1][1])
        )

    def LoadWeightsStream(self, request_iterator, context):
        from axpo_inference.checkpoint import WeightStreamAssembler
        from axpo_inference.errors import InvalidRequestError

        header = next(request_iterator).header
        asm = WeightStreamAssembler(self.expected, header.tensor_count)
        try:
            for msg in request_iterator:
                c = msg.chunk
                asm.add(c.name, c.dtype, c.shape, c.offset, c.data, c.total_bytes)
            folder = asm.finish()
        except InvalidRequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._apply(folder, header.policy_version, context)
        return inference_pb2.LoadWeightsStreamResponse(
            policy_version=self.version, bytes_received=asm.bytes_received
        )

    def Status(self, request, context):
        return inference_pb2.InferenceServiceStatusResponse(
            model="fake", backend="fake", policy_version=self.version
        )


@contextmanager
def fake_replicas(
    fakes: list[RecordingInference],
) -> Iterator[list[RpcClientSettings]]:
    """Serve each fake on its own gRPC server (port 0); yields their client settings."""
    servers = [
        start_server(
            [
                ServiceRegistration(
                    name="axpo.v1.InferenceService",
                    add=lambda s, f=f: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
                        f, s
                    ),
                )
            ],
            RpcServerSettings(port=0),
            service="inference",
        )
        for f in fakes
    ]
    try:
        yield [RpcClientSettings(target=s.address) for s in servers]
    finally:
        for s in servers:
            s.stop(0)
