"""Pure parts of the inference engine: the entropy estimator, image token counts, and the
weight checks and stream assembly (no vLLM needed)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from axpo_inference.checkpoint import (
    TensorSpec,
    WeightStreamAssembler,
    check_weights,
    read_safetensors_specs,
)
from axpo_inference.entropy import topk_entropy
from axpo_inference.errors import InvalidRequestError
from axpo_inference.images import image_tokens


def _entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def test_entropy_exact_when_the_top_k_hold_all_the_mass() -> None:
    for probs in ([1.0], [0.5, 0.5], [0.7, 0.2, 0.1], [0.25] * 4):
        assert topk_entropy([math.log(p) for p in probs]) == pytest.approx(_entropy(probs))


def test_entropy_is_a_lower_bound_and_exact_for_a_flat_tail() -> None:
    uniform = [1 / 1000] * 1000
    est = topk_entropy([math.log(p) for p in uniform[:20]])
    assert est == pytest.approx(math.log(1000))  # tail as likely as the k-th token: exact
    peaked = [0.6, 0.2, 0.1] + [0.1 / 500] * 500
    est = topk_entropy([math.log(p) for p in peaked[:5]])
    assert est <= _entropy(peaked) + 1e-9
    truncated = _entropy(peaked[:5])
    renormalized = _entropy([p / sum(peaked[:5]) for p in peaked[:5]])
    assert est > truncated  # the tail counts
    assert abs(est - _entropy(peaked)) < abs(renormalized - _entropy(peaked))


def test_entropy_order_and_filtered_tokens() -> None:
    lps = [math.log(0.25), math.log(0.5), -math.inf]
    assert topk_entropy(lps) == pytest.approx(topk_entropy([math.log(0.5), math.log(0.25)]))
    assert topk_entropy([]) == 0.0
    assert topk_entropy([0.0]) == 0.0


def test_image_tokens_follow_qwen_vl_resizing() -> None:
    assert image_tokens(64, 96, 32, 1024, 512 * 512) == 6
    assert image_tokens(128, 64, 32, 1024, 512 * 512) == 8
    assert image_tokens(10, 10, 32, 1024, 512 * 512) == 1  # upscaled to the minimum
    assert image_tokens(4000, 4000, 32, 1024, 512 * 512) <= 256  # downscaled to the budget


SPECS = {"a": TensorSpec("a", (2, 3), "float32"), "b": TensorSpec("b", (4,), "float32")}


def test_check_weights_names_shapes_dtypes() -> None:
    check_weights(SPECS, SPECS)
    with pytest.raises(InvalidRequestError, match="unknown tensor"):
        check_weights(SPECS, {**SPECS, "c": TensorSpec("c", (1,), "float32")})
    with pytest.raises(InvalidRequestError, match="missing"):
        check_weights(SPECS, {"a": SPECS["a"]})
    with pytest.raises(InvalidRequestError, match=r"a has shape \[3, 2\]"):
        check_weights(SPECS, {**SPECS, "a": TensorSpec("a", (3, 2), "float32")})
    with pytest.raises(InvalidRequestError, match="dtype"):
        check_weights(SPECS, {**SPECS, "b": TensorSpec("b", (4,), "int64")})


def test_stream_assembler_writes_a_safetensors_file() -> None:
    asm = WeightStreamAssembler(SPECS, 2)
    a = struct.pack("<6f", *range(6))
    asm.add("a", "float32", [2, 3], 0, a[:10], 24)
    asm.add("a", "float32", [2, 3], 10, a[10:], 24)
    asm.add("b", "float32", [4], 0, struct.pack("<4f", 1, 2, 3, 4), 16)
    folder = asm.finish()
    try:
        file = folder / "model.safetensors"
        assert read_safetensors_specs(folder) == SPECS
        raw = file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        start, end = header["a"]["data_offsets"]
        assert raw[8 + n + start : 8 + n + end] == a
        assert asm.bytes_received == 40
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


@pytest.mark.parametrize(
    ("chunk", "field"),
    [
        (("z", "float32", [1], 0, b"0000", 4), "chunk.name"),
        (("a", "float32", [6], 0, b"", 24), "chunk.shape"),
        (("a", "int8", [2, 3], 0, b"", 6), "chunk.dtype"),
        (("a", "float32", [2, 3], 0, b"", 12), "chunk.total_bytes"),
        (("a", "float32", [2, 3], 4, b"0000", 24), "chunk.offset"),
        (("a", "float32", [2, 3], 0, b"0" * 28, 24), "chunk.data"),
    ],
)
def test_stream_assembler_refuses_bad_chunks(chunk: tuple, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError, match=field):
        WeightStreamAssembler(SPECS, 2).add(*chunk)


def test_stream_assembler_refuses_incomplete_streams() -> None:
    asm = WeightStreamAssembler(SPECS, 2)
    asm.add("a", "float32", [2, 3], 0, b"0" * 12, 24)
    with pytest.raises(InvalidRequestError, match="incomplete"):
        asm.finish()
    asm = WeightStreamAssembler(SPECS, 3)
    asm.add("a", "float32", [2, 3], 0, b"0" * 24, 24)
    asm.add("b", "float32", [4], 0, b"0" * 16, 16)
    with pytest.raises(InvalidRequestError, match="tensor_count"):
        asm.finish()


def test_read_safetensors_specs_refuses_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"no \*\.safetensors files"):
        read_safetensors_specs(tmp_path)
    bad = tmp_path / "model.safetensors"
    for raw in (b"hello", struct.pack("<Q", 200 << 20) + b"{}", struct.pack("<Q", 5) + b"nojs!"):
        bad.write_bytes(raw)
        with pytest.raises(InvalidRequestError, match="is not a readable safetensors file"):
            read_safetensors_specs(tmp_path)
