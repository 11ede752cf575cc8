"""Checkpoint files: tensor specs from safetensors headers, the weight checks a load must pass,
and the assembly of a streamed load (``LoadWeightsStream`` chunks) into a safetensors file.

No vLLM and no torch: the engine validates a load with these before it touches vLLM, and the
learner's tests run the same checks in a fake replica.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from axpo_inference.errors import InvalidRequestError

# safetensors dtype names <-> torch dtype names (the names TensorChunk.dtype carries).
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_DTYPE_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
# Bytes per element of the float dtypes a load may carry.
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one checkpoint tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_specs(path: Path) -> dict[str, TensorSpec]:
    """Tensor specs from the headers of ``path`` (a ``.safetensors`` file or a directory of
    them). Reads only the headers. Raises InvalidRequestError naming the file when unreadable."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise InvalidRequestError(f"path: no *.safetensors files in {path}")
    specs: dict[str, TensorSpec] = {}
    for file in files:
        try:
            # framework="numpy": only the header is read (no tensor), and torch is not imported
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    view = f.get_slice(name)
                    dtype = view.get_dtype()
                    specs[name] = TensorSpec(
                        name, tuple(int(d) for d in view.get_shape()), _ST_DTYPES.get(dtype, dtype)
                    )
        except (OSError, SafetensorError) as exc:
            raise InvalidRequestError(
                f"path: {file} is not a readable safetensors file: {exc}"
            ) from exc
    return specs


def check_weights(expected: dict[str, TensorSpec], got: dict[str, TensorSpec]) -> None:
    """Raise InvalidRequestError unless ``got`` has exactly the expected names, with the same
    shapes and a floating dtype vLLM converts (float32, bfloat16, float16)."""
    unknown = sorted(set(got) - set(expected))
    if unknown:
        raise InvalidRequestError(
            f"weights: {len(unknown)} unknown tensor name(s), e.g. {unknown[:3]} "
            f"(expected the serving checkpoint's names, e.g. {sorted(expected)[:2]})"
        )
    missing = sorted(set(expected) - set(got))
    if missing:
        raise InvalidRequestError(
            f"weights: {len(missing)} tensor(s) missing, e.g. {missing[:3]} "
            "(a load must carry the whole state dict)"
        )
    for name, spec in got.items():
        want = expected[name]
        if spec.shape != want.shape:
            raise InvalidRequestError(
                f"weights: {name} has shape {list(spec.shape)}, expected {list(want.shape)}"
            )
        if spec.dtype not in ITEMSIZE:
            raise InvalidRequestError(
                f"weights: {name} has dtype {spec.dtype}, expected one of {sorted(ITEMSIZE)}"
            )


def write_safetensors(
    path: Path, specs: dict[str, TensorSpec], buffers: dict[str, bytearray] | dict[str, bytes]
) -> None:
    """Write raw little-endian tensor bytes as a safetensors file (no torch needed)."""
    # Not safetensors.serialize_file: it copies every byte through its own write buffer (a
    # 148 MB streamed load: 44 ms instead of 36); this writes the callers' buffers as they are.
    header: dict[str, Any] = {}
    offset = 0
    names = sorted(specs)
    for name in names:
        n = len(buffers[name])
        header[name] = {
            "dtype": _DTYPE_TO_ST[specs[name].dtype],
            "shape": list(specs[name].shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            f.write(buffers[name])


class WeightStreamAssembler:
    """Assembles a stream of tensor chunks (``TensorChunk`` fields) into a safetensors file.

    Each chunk is checked as it arrives (known name, expected shape, dtype, byte size, chunks of
    a tensor contiguous and in order), so a bad stream is refused before it is buffered.
    :meth:`finish` checks completeness and writes ``model.safetensors`` into a fresh temporary
    directory that the caller passes to :meth:`InferenceEngine.load_weights_from_path` and
    then removes.
    """

    def __init__(self, expected: dict[str, TensorSpec], tensor_count: int) -> None:
        self._expected = expected
        self._tensor_count = tensor_count
        self._buffers: dict[str, bytearray] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._filled: dict[str, int] = {}
        self.bytes_received = 0

    def add(
        self,
        name: str,
        dtype: str,
        shape: Sequence[int],
        offset: int,
        data: bytes,
        total_bytes: int,
    ) -> None:
        if name not in self._expected:
            raise InvalidRequestError(f"chunk.name: unknown tensor {name!r}")
        want = self._expected[name]
        if tuple(shape) != want.shape:
            raise InvalidRequestError(
                f"chunk.shape: {name} has shape {list(shape)}, expected {list(want.shape)}"
            )
        if dtype not in ITEMSIZE:
            raise InvalidRequestError(
                f"chunk.dtype: {name} has dtype {dtype!r}, expected one of {sorted(ITEMSIZE)}"
            )
        size = want.numel * ITEMSIZE[dtype]
        if total_bytes != size:
            raise InvalidRequestError(
                f"chunk.total_bytes: {name} says {total_bytes}, {dtype} {list(shape)} is {size}"
            )
        if name not in self._buffers:
            self._buffers[name] = bytearray(size)
            self._specs[name] = TensorSpec(name, want.shape, dtype)
            self._filled[name] = 0
        elif self._specs[name].dtype != dtype:
            raise InvalidRequestError(f"chunk.dtype: {name} changed dtype mid-tensor")
        if offset != self._filled[name]:
            raise InvalidRequestError(
                f"chunk.offset: {name} chunk at {offset}, expected {self._filled[name]} "
                "(chunks of a tensor must arrive in order)"
            )
        if offset + len(data) > size:
            raise InvalidRequestError(f"chunk.data: {name} overflows its {size} bytes")
        self._buffers[name][offset : offset + len(data)] = data
        self._filled[name] += len(data)
        self.bytes_received += len(data)

    def finish(self) -> Path:
        """Check completeness and write the file; returns its (temporary) directory."""
        partial = [n for n, b in self._buffers.items() if self._filled[n] != len(b)]
        if partial:
            raise InvalidRequestError(f"chunk: tensor {partial[0]} incomplete at end of stream")
        if len(self._buffers) != self._tensor_count:
            raise InvalidRequestError(
                f"header.tensor_count: said {self._tensor_count}, "
                f"stream carried {len(self._buffers)}"
            )
        check_weights(self._expected, self._specs)
        out = Path(tempfile.mkdtemp(prefix="axpo-weights-"))
        try:
            write_safetensors(out / "model.safetensors", self._specs, self._buffers)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        return out
