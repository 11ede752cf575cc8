"""axpo_learner.publish against a recording InferenceService on a real gRPC server (port 0).

The fake servicer applies the inference engine's own weight checks (axpo_inference.engine:
``check_weights`` on the file's headers for LoadWeights, ``WeightStreamAssembler`` for the
stream) against the tiny checkpoint the model was built from, then records what it got. The
real vLLM engine's load path is tested with the inference service.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from axpo.config import RpcClientSettings, RpcServerSettings
from axpo.rpc.server import ServiceRegistration, start_server
from axpo.tiny_model import build_tiny_model
from axpo.v1 import inference_pb2, inference_pb2_grpc
from axpo_inference.engine import (
    InvalidRequestError,
    WeightStreamAssembler,
    check_weights,
    read_safetensors_specs,
)
from axpo_learner.publish import PathPublisher, PublishError, StreamPublisher

pytestmark = pytest.mark.integration


class RecordingInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, checkpoint: Path) -> None:
        self.expected = read_safetensors_specs(checkpoint)
        self.version = 0
        self.loaded: list[tuple[int, dict[str, torch.Tensor]]] = []

    def _apply(self, path: Path, version: int, context) -> None:
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


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path):
    from transformers import AutoModelForImageTextToText

    ckpt = build_tiny_model(tmp_path / "model", tie_word_embeddings=request.param)
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "trained" weights differ from the checkpoint
    fakes = [RecordingInference(ckpt), RecordingInference(ckpt)]
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
    targets = [RpcClientSettings(target=s.address) for s in servers]
    yield model, fakes, targets, tmp_path
    for s in servers:
        s.stop(0)


def _check_received(model, fakes, version):
    want = model.state_dict()
    for fake in fakes:
        got_version, tensors = fake.loaded[-1]
        assert got_version == version
        for name, t in tensors.items():
            assert torch.equal(t, want[name]), name


@pytest.mark.parametrize("transport", ["path", "stream"])
def test_publish_reaches_every_replica_with_serving_names(setup, transport):
    model, fakes, targets, tmp = setup
    if transport == "path":
        pub = PathPublisher(targets, tmp / "shared", keep=1)
    else:
        pub = StreamPublisher(targets, chunk_bytes=4096)  # many chunks per tensor
    try:
        for version in (1, 2):
            res = pub.publish(model, version)
            assert res.replicas == 2
            _check_received(model, fakes, version)
        # A replica that refuses (version not newer) fails the publish loudly.
        with pytest.raises(PublishError, match="stale version"):
            pub.publish(model, 2)
    finally:
        pub.close()
    if transport == "path":
        assert [p.name for p in (tmp / "shared").glob("v*")] == ["v00000002"]
