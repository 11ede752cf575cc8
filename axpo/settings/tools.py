"""Settings of the tool server and each tool (``axpo serve tools``, ``AXPO_TOOLS_*``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from axpo.settings.base import (
    MODEL_CONFIG,
    LogSettings,
    RpcServerSettings,
    ServiceSettings,
    service_settings,
)


class ZoomSettings(BaseModel):
    """The crop/zoom tool (Qwen3-VL ``image_zoom_in_tool``)."""

    model_config = MODEL_CONFIG

    coordinates: Literal["relative_1000", "pixels"] = "relative_1000"
    """``relative_1000``: bbox_2d in 0-1000 relative coordinates (Qwen3-VL); ``pixels``:
    absolute pixels (Qwen2.5-VL-style models)."""
    min_side: Annotated[int, Field(ge=1)] = 32
    """A box side shorter than this (in source pixels) is expanded around its centre."""
    factor: Annotated[int, Field(ge=1)] = 32
    """Output sides are multiples of this (Qwen3-VL: patch 16 x merge 2)."""
    min_pixels: Annotated[int, Field(ge=1)] = 256 * 32 * 32
    """The crop is upscaled to at least this many pixels."""
    max_pixels: Annotated[int, Field(ge=1)] = 1280 * 32 * 32
    """Pixel budget: the crop is downscaled to at most this many pixels."""
    max_input_pixels: Annotated[int, Field(ge=1)] = 64_000_000
    """Images with more pixels are refused before decoding (decompression bombs)."""
    output_format: Literal["jpeg", "png"] = "jpeg"
    """Encoding of the returned crop. JPEG encodes a 512x512 crop in ~1 ms; PNG (lossless,
    fastest compression) takes ~20 ms on photo-like content (bench/README.md)."""
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    """JPEG quality of the returned crop."""
    decoded_cache_images: Annotated[int, Field(ge=0)] = 32
    """Decoded source images kept by content hash (a group's rollouts zoom the same image)."""


class PythonToolSettings(BaseModel):
    """The sandboxed ``python`` tool."""

    model_config = MODEL_CONFIG

    enabled: bool = True
    """Offer the python tool."""
    workers: Annotated[int, Field(ge=1, le=64)] = 4
    """Warm pre-forked workers (concurrent executions)."""
    warm: bool = True
    """Use the warm pool (numpy and Pillow pre-imported); off: a fresh interpreter per call."""
    wall_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    """Wall-clock limit per call; the whole process tree is killed past it."""
    cpu_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    """CPU-time limit per call."""
    memory_mb: Annotated[int, Field(ge=64)] = 1024
    """Address-space limit per process, in MiB."""
    tmp_mb: Annotated[int, Field(ge=1)] = 64
    """Size of the private writable tmp, in MiB."""
    file_mb: Annotated[int, Field(ge=1)] = 16
    """Largest file the code may write, in MiB."""
    max_processes: Annotated[int, Field(ge=1)] = 16
    """Processes the code may run at once."""
    output_kb: Annotated[int, Field(ge=1)] = 16
    """stdout and stderr are each cut to this many KiB, with a truncation marker."""
    max_images_out: Annotated[int, Field(ge=0)] = 4
    """Images the code saves that come back to the model."""
    allow_unsandboxed: bool = False
    """DANGEROUS opt-out: run the python tool with only rlimits where namespaces are
    unavailable. Logged loudly at every start. Never enable on shared machines."""


class SearchSettings(BaseModel):
    """The ``search`` tool."""

    model_config = MODEL_CONFIG

    backend: Literal["bm25", "http"] = "bm25"
    """``bm25``: the bundled local corpus (or ``corpus_path``); ``http``: a real search service."""
    corpus_path: str | None = None
    """JSONL corpus (``{"id", "title", "text"}`` per line); unset means the bundled one."""
    default_k: Annotated[int, Field(ge=1, le=50)] = 3
    """Results returned when the call does not say."""
    max_k: Annotated[int, Field(ge=1, le=50)] = 10
    """Most results one call may ask for."""
    snippet_chars: Annotated[int, Field(ge=20)] = 300
    """Characters of each result's text shown to the model."""
    http_url: str | None = None
    """HTTP backend: URL called with GET ``?q=<query>&k=<k>``."""
    http_results_path: str = "results"
    """HTTP backend: dotted path of the result list in the JSON response."""
    http_title_field: str = "title"
    """HTTP backend: field of a result holding its title."""
    http_snippet_field: str = "snippet"
    """HTTP backend: field of a result holding its snippet."""
    http_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    """HTTP backend: request timeout."""


class ToolsSettings(ServiceSettings):
    """The tool server (``axpo serve tools``)."""

    model_config = service_settings("AXPO_TOOLS_")

    rpc: RpcServerSettings = RpcServerSettings(port=50052)
    """Where the service listens."""
    log: LogSettings = LogSettings()
    """Logging."""
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    """Tool calls executed at once; more wait in a queue."""
    max_queue: Annotated[int, Field(ge=0)] = 256
    """Calls allowed to wait; beyond it a call fails with RESOURCE_EXHAUSTED."""
    default_deadline_s: Annotated[float, Field(gt=0)] = 30.0
    """Deadline of a call that sets none (queueing included)."""
    zoom: ZoomSettings = ZoomSettings()
    """Crop/zoom tool."""
    python: PythonToolSettings = PythonToolSettings()
    """Python sandbox tool."""
    search: SearchSettings = SearchSettings()
    """Search tool."""
