"""Weight publication to the inference replicas, behind one small interface.

:class:`WeightPublisher` ``.publish(model, version)`` sends the model's weights to every
registered replica and returns only when each confirmed it now serves ``version`` (anything
else raises :class:`PublishError`). Tensors carry exactly the serving checkpoint's names
(``save_pretrained`` names; with tied embeddings no ``lm_head.weight``), which the inference
engine checks. Transports: :class:`PathPublisher` (safetensors in a shared directory, then
``LoadWeights``) and :class:`StreamPublisher` (``LoadWeightsStream`` chunks). An NCCL transport
would be one more subclass.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import save_file

from axpo.rpc.client import open_channel
from axpo.settings.base import RpcClientSettings
from axpo.v1 import inference_pb2, inference_pb2_grpc

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class PublishError(RuntimeError):
    """A replica refused or did not confirm the new weights."""


def serving_state_dict(
    model: Any, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors (or ``state``, its full state dict gathered from FSDP shards) under
    the names ``save_pretrained`` writes (tied output layer left out), detached, contiguous,
    on CPU."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in (model.state_dict() if state is None else state).items():
        if tied and name.endswith("lm_head.weight"):
            continue
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


@dataclass(frozen=True)
class PublishResult:
    version: int
    replicas: int
    bytes: int
    seconds: float


class WeightPublisher(ABC):
    """Sends new weights to every registered replica and waits for each confirmation."""

    def __init__(self, targets: Sequence[RpcClientSettings]) -> None:
        self._channels = [open_channel(t) for t in targets]
        self._stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in self._channels]
        self._targets = [t.target for t in targets]

    def publish(
        self, model: Any, version: int, state: dict[str, torch.Tensor] | None = None
    ) -> PublishResult:
        """Send ``model``'s weights (``state`` when given: the full state dict of a sharded
        model, see ``Trainer.full_state_dict``) as ``version`` to every replica."""
        started = time.perf_counter()
        tensors = serving_state_dict(model, state)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self._send(tensors, version)
        return PublishResult(version, len(self._stubs), size, time.perf_counter() - started)

    @abstractmethod
    def _send(self, tensors: dict[str, torch.Tensor], version: int) -> None: ...

    def serving_versions(self, timeout_s: float = 10.0) -> list[int]:
        """The version each replica serves now (``InferenceService.Status``); raises
        :class:`PublishError` when one does not answer."""
        out = []
        for target, stub in zip(self._targets, self._stubs, strict=True):
            try:
                resp = stub.Status(inference_pb2.InferenceServiceStatusRequest(), timeout=timeout_s)
            except grpc.RpcError as exc:
                raise PublishError(f"{target}: Status failed: {exc.details()}") from exc
            out.append(int(resp.policy_version))
        return out

    def _confirm(self, target: str, version: int, got: int) -> None:
        if got != version:
            raise PublishError(f"{target}: asked to serve version {version}, now serves {got}")

    def close(self) -> None:
        for c in self._channels:
            c.close()


class PathPublisher(WeightPublisher):
    """Writes ``<directory>/v<version>/model.safetensors`` (atomically: temporary directory,
    then rename), calls ``LoadWeights`` on every replica, keeps the newest ``keep`` versions."""

    def __init__(
        self, targets: Sequence[RpcClientSettings], directory: str | Path, keep: int = 2
    ) -> None:
        super().__init__(targets)
        self.directory = Path(directory)
        self.keep = keep

    def write(self, tensors: dict[str, torch.Tensor], version: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"v{version:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _send(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        path = self.write(tensors, version)
        for target, stub in zip(self._targets, self._stubs, strict=True):
            try:
                resp = stub.LoadWeights(
                    inference_pb2.LoadWeightsRequest(path=str(path), policy_version=version)
                )
            except grpc.RpcError as exc:
                raise PublishError(f"{target}: LoadWeights failed: {exc.details()}") from exc
            self._confirm(target, version, resp.policy_version)
        versions = sorted(self.directory.glob("v*"))
        for old in versions[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def weight_chunks(
    tensors: dict[str, torch.Tensor], version: int, chunk_bytes: int
) -> Iterator[inference_pb2.LoadWeightsStreamRequest]:
    """The header, then every tensor's little-endian bytes in order, ``chunk_bytes`` at most."""
    yield inference_pb2.LoadWeightsStreamRequest(
        header=inference_pb2.WeightStreamHeader(policy_version=version, tensor_count=len(tensors))
    )
    for name in sorted(tensors):
        t = tensors[name]
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise PublishError(f"{name}: dtype {t.dtype} cannot be published")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        offset = 0
        while True:
            data = raw[offset : offset + chunk_bytes]
            yield inference_pb2.LoadWeightsStreamRequest(
                chunk=inference_pb2.TensorChunk(
                    name=name,
                    dtype=dtype,
                    shape=list(t.shape),
                    offset=offset,
                    data=data,
                    total_bytes=len(raw),
                )
            )
            offset += len(data)
            if offset >= len(raw):
                break


class StreamPublisher(WeightPublisher):
    """Streams the tensors to every replica with ``LoadWeightsStream``."""

    def __init__(self, targets: Sequence[RpcClientSettings], chunk_bytes: int = 4 << 20) -> None:
        super().__init__(targets)
        self.chunk_bytes = chunk_bytes

    def _send(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        for target, stub in zip(self._targets, self._stubs, strict=True):
            try:
                resp = stub.LoadWeightsStream(weight_chunks(tensors, version, self.chunk_bytes))
            except grpc.RpcError as exc:
                raise PublishError(f"{target}: LoadWeightsStream failed: {exc.details()}") from exc
            self._confirm(target, version, resp.policy_version)
