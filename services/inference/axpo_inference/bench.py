"""``axpo bench inference``: the inference service on the tiny model, side by side in one process.

One engine (vLLM, fp32 on CPU) and its gRPC server on port 0 in this process; the tiny model is
built in a temporary directory. Figures:

- ``grpc_overhead_ratio``: a batch of concurrent Generate calls (8 prompts × n=4 × 64 tokens,
  one image each) through the service ÷ the same batch through the engine directly (best of at
  least 5 interleaved rounds each; floor ≤ 1.10).
- ``resume_ratio``: ResumeFromPrefix from a 90 % frozen prefix of an earlier rollout ÷
  generating that rollout's full length from a fresh prompt of the same length. Prefill-heavy
  (1.5 k-token prompt with an image, 64-token continuation); the resume finds the rollout's
  blocks in the prefix cache, as an AXPO resample does (floor ≤ 0.40).
- ``load_weights_s``: LoadWeights of a perturbed state dict from a safetensors path (drain,
  reload, cache resets, version bump); ``load_weights_vs_copy_ratio``: that ÷ the time to copy
  the same bytes from the (page-cached) file into memory.
- ``tokens_per_s``: 8 prompts × n=8 × up to 128 tokens, one image each, through the service.
"""

from __future__ import annotations

import io
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from axpo.contracts import convert
from axpo.contracts.domain import Image, SamplingParams
from axpo.rpc.client import open_channel
from axpo.settings.base import RpcClientSettings, RpcServerSettings
from axpo.settings.inference import InferenceSettings
from axpo.v1 import inference_pb2, inference_pb2_grpc
from axpo_inference.engine import InferenceEngine
from axpo_inference.server import start


def _png(seed: int, size: int = 224) -> Image:
    from PIL import Image as PILImage

    rng = random.Random(seed)
    img = PILImage.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(200):
        img.putpixel((rng.randrange(size), rng.randrange(size)), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


def _prompt(tok: Any, rng: random.Random, words: int) -> list[int]:
    text = " ".join(
        rng.choice(["red", "blue", "grid", "cell", "zoom", "frame", "7"]) for _ in range(words)
    )
    ids: list[int] = tok.encode(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{text}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    return ids


def _best(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(rounds: int = 3) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from axpo.study.tiny_model import build_tiny_model

    rounds = max(1, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny", seed=0)
        tok = AutoTokenizer.from_pretrained(model)
        settings = InferenceSettings(
            model=str(model),
            max_model_len=4096,
            rpc=RpcServerSettings(port=0, max_workers=64, log_requests=False),
        )
        with InferenceEngine(settings) as engine:
            server = start(settings, engine)
            channel = open_channel(RpcClientSettings(target=server.address, deadline_s=600))
            try:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                return _measure(engine, stub, tok, model, rounds)
            finally:
                channel.close()
                server.stop(None)


def _measure(
    engine: InferenceEngine,
    stub: inference_pb2_grpc.InferenceServiceStub,
    tok: Any,
    model: Path,
    rounds: int,
) -> dict[str, Any]:
    rng = random.Random(0)
    pool = ThreadPoolExecutor(64)
    images = [_png(i) for i in range(8)]

    # ---------------------------------------------------------------- gRPC overhead
    batch = [(_prompt(tok, rng, 40), images[i]) for i in range(8)]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=64, seed=1, top_logprobs=5)

    def direct() -> None:
        list(pool.map(lambda b: engine.generate(b[0], [b[1]], params), batch))

    def via_grpc() -> None:
        def one(b: tuple[list[int], Image]) -> Any:
            return stub.Generate(
                inference_pb2.GenerateRequest(
                    prompt_token_ids=b[0],
                    images=[convert.image_to_proto(b[1])],
                    sampling=convert.sampling_params_to_proto(params),
                )
            )

        list(pool.map(one, batch))

    direct()  # warm-up (vision encoder, prefix cache of the prompts)
    t_direct, t_grpc = [], []
    for _ in range(max(5, rounds)):  # interleaved, so drift hits both; noisy on 2 cores
        t_direct.append(_best(direct, 1))
        t_grpc.append(_best(via_grpc, 1))
    grpc_ratio = min(t_grpc) / min(t_direct)

    # ---------------------------------------------------------------- resume
    gen_len = 64
    ratios = []
    full_times, resume_times = [], []
    for r in range(rounds):
        prompt = _prompt(tok, rng, 1500)
        image = _png(100 + r)
        greedy = SamplingParams(temperature=0.0, max_tokens=gen_len)
        original = engine.generate(prompt, [image], greedy)[0].token_ids  # the rollout
        fresh = _prompt(tok, rng, 1500)  # same shape, cold cache: the full-generation cost
        start = time.perf_counter()
        engine.generate(
            fresh, [_png(200 + r)], SamplingParams(temperature=0.0, max_tokens=len(original))
        )
        t_full = time.perf_counter() - start
        cut = int(len(original) * 0.9)
        start = time.perf_counter()
        stub.ResumeFromPrefix(
            inference_pb2.ResumeFromPrefixRequest(
                prompt_token_ids=prompt,
                prefix_token_ids=original[:cut],
                images=[convert.image_to_proto(image)],
                sampling=convert.sampling_params_to_proto(
                    SamplingParams(temperature=0.0, max_tokens=max(1, len(original) - cut))
                ),
            )
        )
        t_resume = time.perf_counter() - start
        full_times.append(t_full)
        resume_times.append(t_resume)
        ratios.append(t_resume / t_full)

    # ---------------------------------------------------------------- weights
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    load_times, copy_times = [], []
    with tempfile.TemporaryDirectory() as wdir:
        for r in range(rounds):
            path = Path(wdir) / f"v{r + 1}"
            path.mkdir()
            new = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
            save_file(new, str(path / "model.safetensors"))
            file = path / "model.safetensors"
            size = file.stat().st_size
            buf = bytearray(size)
            start = time.perf_counter()
            with file.open("rb") as f:
                f.readinto(buf)
            copy_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            stub.LoadWeights(
                inference_pb2.LoadWeightsRequest(
                    path=str(path), policy_version=engine.policy_version + 1
                )
            )
            load_times.append(time.perf_counter() - start)
    load_s = statistics.median(load_times)
    copy_s = statistics.median(copy_times)

    # ---------------------------------------------------------------- throughput
    prompts = [(_prompt(tok, rng, 30), images[i]) for i in range(8)]
    tp = SamplingParams(n=8, temperature=1.0, max_tokens=128, seed=3, top_logprobs=5)

    def throughput() -> int:
        def one(b: tuple[list[int], Image]) -> int:
            resp = stub.Generate(
                inference_pb2.GenerateRequest(
                    prompt_token_ids=b[0],
                    images=[convert.image_to_proto(b[1])],
                    sampling=convert.sampling_params_to_proto(tp),
                )
            )
            return sum(len(s.token_ids) for s in resp.samples)

        return sum(pool.map(one, prompts))

    throughput()  # warm-up
    best_tps = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        tokens = throughput()
        best_tps = max(best_tps, tokens / (time.perf_counter() - start))
    pool.shutdown()
    status = engine.status()
    return {
        "model": "tiny Qwen3-VL (axpo model tiny, seed 0), float32",
        "backend": status.backend,
        "rounds": rounds,
        "grpc_overhead_ratio": round(grpc_ratio, 3),
        "grpc_batch_s": round(min(t_grpc), 4),
        "direct_batch_s": round(min(t_direct), 4),
        "resume_ratio": round(statistics.median(ratios), 3),
        "resume_s": round(statistics.median(resume_times), 4),
        "full_generation_s": round(statistics.median(full_times), 4),
        "load_weights_s": round(load_s, 4),
        "weights_mib": round(size / 2**20, 2),
        "copy_s": round(copy_s, 5),
        "load_weights_vs_copy_ratio": round(load_s / copy_s, 1),
        "tokens_per_s": round(best_tps, 1),
        "policy_version": status.policy_version,
    }


def print_table(result: dict[str, Any]) -> None:
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
