"""``axpo serve inference --model DIR`` on the tiny Qwen3-VL with TIED embeddings: serves,
swaps streamed weights in place (an image seen before the swap), and the new greedy output
equals transformers with the same weights (the CPU lm_head repack: docs/platform.md, "The stale
tied lm_head")."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from PIL import Image as PILImage  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from axpo.contracts import convert  # noqa: E402
from axpo.contracts.domain import Image, SamplingParams  # noqa: E402
from axpo.rpc.client import open_channel, wait_for_health  # noqa: E402
from axpo.settings.base import RpcClientSettings  # noqa: E402
from axpo.study.tiny_model import build_tiny_model  # noqa: E402
from axpo.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from axpo_learner.publish import weight_chunks  # noqa: E402

pytestmark = pytest.mark.e2e

AXPO = [sys.executable, "-m", "axpo.cli.main"]
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which colour?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n"
)


def _image() -> Image:
    img = PILImage.new("RGB", (96, 64), (20, 160, 90))
    for x in range(0, 96, 6):
        img.putpixel((x, x % 64), (250, 250, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


def _hf_greedy(model_dir: Path, state: dict[str, Any], image: Image, n: int) -> list[int]:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    assert model.get_output_embeddings().weight.data_ptr() == (
        model.get_input_embeddings().weight.data_ptr()
    )
    pil = PILImage.open(io.BytesIO(image.data)).convert("RGB")
    inputs = processor(text=[PROMPT], images=[pil], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


def test_serve_inference_tied_model_swaps_streamed_weights(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tied", seed=0, tie_word_embeddings=True)
    processor = AutoProcessor.from_pretrained(model_dir)
    ids = processor.tokenizer.encode(PROMPT, add_special_tokens=False)
    image = _image()
    port_file = tmp_path / "port"
    env = {**os.environ, "AXPO_INFERENCE_MAX_MODEL_LEN": "512"}
    server = subprocess.Popen(
        [
            *AXPO,
            "serve",
            "inference",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (port_file.exists() and port_file.read_text().strip()):
            assert server.poll() is None, "axpo serve inference exited"
            assert time.monotonic() < deadline, "server did not write its port"
            time.sleep(0.2)
        channel = open_channel(
            RpcClientSettings(target=f"127.0.0.1:{port_file.read_text().strip()}", deadline_s=120)
        )
        wait_for_health(channel, timeout_s=10, service="axpo.v1.InferenceService")
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        greedy = convert.sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=16))
        request = inference_pb2.GenerateRequest(
            prompt_token_ids=ids, images=[convert.image_to_proto(image)], sampling=greedy
        )
        before = stub.Generate(request).samples[0]  # the image enters the encoder cache
        assert before.policy_version == 0

        gen = torch.Generator().manual_seed(4)
        state = load_file(str(model_dir / "model.safetensors"))
        assert "lm_head.weight" not in state
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}

        loaded = stub.LoadWeightsStream(weight_chunks(state, 5, 1 << 20))
        assert loaded.policy_version == 5
        after = stub.Generate(request).samples[0]
        assert after.policy_version == 5
        assert list(after.token_ids) == _hf_greedy(model_dir, state, image, 16)
        assert list(after.token_ids) != list(before.token_ids)
        status = stub.Status(inference_pb2.InferenceServiceStatusRequest())
        assert (status.policy_version, status.max_model_len) == (5, 512)
        channel.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=60) == 0
        finally:
            if server.poll() is None:
                server.kill()
