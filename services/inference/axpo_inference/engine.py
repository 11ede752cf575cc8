"""The inference engine: one vLLM ``AsyncLLM`` in-process, callable from many threads.

vLLM's async engine lives on an asyncio loop that this class runs in a background thread.
Every public method is synchronous and thread-safe: the gRPC server calls it from its worker
threads, each call becomes a coroutine on the loop, and vLLM batches whatever is in flight
(continuous batching across concurrent RPCs). Nothing here touches gRPC.

Prompts are token ids with one *unexpanded* ``<|image_pad|>`` per image (vLLM expands them from
the images, PLATFORM.md). :meth:`InferenceEngine.resume_from_prefix` sends prompt + frozen
prefix in the same form, so callers never see expanded placeholders; prefix caching makes the
shared part nearly free.

Weight swaps (the rule; :meth:`InferenceEngine.load_weights_from_path`):

1. Validate the new weights against the serving checkpoint's tensor names and shapes (read
   from the safetensors headers, no tensor is loaded) and the version against the current one.
   A refused load never touches the engine.
2. Close the admission gate: requests that arrive from now on wait (they will run on the new
   weights).
3. Drain: wait until every admitted request has finished (``drain_timeout_s``; on timeout the
   gate reopens, the old weights keep serving and the load fails FAILED_PRECONDITION).
4. Pause vLLM's scheduler once it is idle (nothing is left to wait for) and reset the
   prefix, encoder and multimodal caches in that same call, then load the file in the
   workers (``worker_ext.AxpoWorkerExtension.axpo_load_weights``: vLLM's in-place reload fed
   from the file's mmap, the CPU ``lm_head`` re-pack). ``AXPO_WEIGHT_LOADER=vllm`` selects the
   generic path this replaced (``pause_generation``, ``reload_weights`` from a directory,
   each reset a call of its own): same results, slower (bench/README.md).
5. Bump the version, resume the engine, reopen the gate.

So a sample is produced entirely by the weights that were serving when it was admitted, and its
``policy_version`` says which. A request admitted before a swap always carries the old version;
one admitted during or after it the new one. The price: a swap waits for the longest in-flight
generation, and new requests wait for the swap.

Vision tokens (image/video placeholders, vision start/end) are never sampled: a logit bias
of -100 keeps them out, because a placeholder the model writes has no image behind it and the
next turn's prompt (and the learner's batch) would be invalid.

Sample scores: the logprob of each sampled token under the sampling policy (vLLM's
``processed_logprobs`` by default: after temperature/top-k/top-p), the top-k alternatives, and an
entropy estimate from the top ``max(top_logprobs, entropy_top_logprobs)`` (see
:mod:`axpo_inference.entropy`).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from axpo.config import InferenceSettings
from axpo.domain import FinishReason, Image, Sample, SamplingParams, TokenScores
from axpo.logs import get_logger, log_event
from axpo_inference.entropy import topk_entropy
from axpo_inference.errors import EngineDeadError, InvalidRequestError, PreconditionError

# vLLM logs to stdout by default; keep stdout for the commands' own output (``--json``).
# Read when vllm is first imported (and inherited by its engine processes).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

T = TypeVar("T")
_LOG = get_logger("axpo.inference")

# safetensors dtype names <-> torch dtype names (the names TensorChunk.dtype carries).
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_DTYPE_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

# How weight swaps reach vLLM: "direct" (default: one worker call that reads the file and
# reloads in place, one pause that also resets the caches) or "vllm" (the generic path:
# vLLM's public pause, its disk reload, each cache reset a call of its own). The old path
# stays selectable to compare the two side by side (``axpo bench learner``) and as a
# fallback.
WEIGHT_LOADER_ENV = "AXPO_WEIGHT_LOADER"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one checkpoint tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GenerationResult:
    samples: tuple[Sample, ...]
    prompt_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class LoadResult:
    policy_version: int
    tensors_loaded: int
    load_ms: float
    bytes_loaded: int = 0
    stages_ms: dict[str, float] = field(default_factory=dict)
    """Where the swap's time went (validate, drain, pause, load, resume...), in ms."""


@dataclass(frozen=True)
class EngineStatus:
    model: str
    backend: str
    policy_version: int
    queue_depth: int
    kv_cache_usage: float
    max_model_len: int
    max_n: int


# --------------------------------------------------------------------------- checkpoint


def read_safetensors_specs(path: Path) -> dict[str, TensorSpec]:
    """Tensor specs from the headers of ``path`` (a ``.safetensors`` file or a directory of
    them). Reads only the headers. Raises InvalidRequestError naming the file when unreadable."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise InvalidRequestError(f"path: no *.safetensors files in {path}")
    specs: dict[str, TensorSpec] = {}
    for file in files:
        try:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 << 20:
                    raise ValueError(f"header of {size} bytes")
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise InvalidRequestError(
                f"path: {file} is not a readable safetensors file: {exc}"
            ) from exc
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info.get("dtype", ""), info.get("dtype", "?"))
            specs[name] = TensorSpec(name, tuple(int(d) for d in info["shape"]), dtype)
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
        if spec.dtype not in _ITEMSIZE:
            raise InvalidRequestError(
                f"weights: {name} has dtype {spec.dtype}, expected one of {sorted(_ITEMSIZE)}"
            )


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
        if dtype not in _ITEMSIZE:
            raise InvalidRequestError(
                f"chunk.dtype: {name} has dtype {dtype!r}, expected one of {sorted(_ITEMSIZE)}"
            )
        size = want.numel * _ITEMSIZE[dtype]
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


def write_safetensors(
    path: Path, specs: dict[str, TensorSpec], buffers: dict[str, bytearray] | dict[str, bytes]
) -> None:
    """Write raw little-endian tensor bytes as a safetensors file (no torch needed)."""
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


# --------------------------------------------------------------------------- images


def _image_grid(config_dir: Path) -> tuple[int, int, int] | None:
    """(factor, min_pixels, max_pixels) of the checkpoint's Qwen-VL image processor, or None."""
    for name, key in (
        ("preprocessor_config.json", None),
        ("processor_config.json", "image_processor"),
    ):
        file = config_dir / name
        if not file.is_file():
            continue
        cfg = json.loads(file.read_text())
        if key is not None:
            cfg = cfg.get(key, {})
        if "patch_size" not in cfg:
            continue
        factor = int(cfg["patch_size"]) * int(cfg.get("merge_size", 2))
        size = cfg.get("size") or {}
        lo = int(size.get("shortest_edge", cfg.get("min_pixels", 56 * 56)))
        hi = int(size.get("longest_edge", cfg.get("max_pixels", 28 * 28 * 1280)))
        return factor, lo, hi
    return None


def image_tokens(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> int:
    """Placeholder tokens one image expands to: Qwen-VL's resize to multiples of ``factor``
    within the pixel budget, then one token per ``factor``² pixels."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


class _ImageCache:
    """Decoded images by SHA-256, so a request may reference an image sent before."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, sha: str) -> Any | None:
        with self._lock:
            img = self._items.get(sha)
            if img is not None:
                self._items.move_to_end(sha)
            return img

    def put(self, sha: str, img: Any) -> None:
        with self._lock:
            self._items[sha] = img
            self._items.move_to_end(sha)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


# --------------------------------------------------------------------------- stats


def _make_kv_logger(sink: dict[str, float]) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _KvUsageLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, *a: Any, **k: Any) -> None:
            if scheduler_stats is not None:
                sink["kv_cache_usage"] = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return _KvUsageLogger


# --------------------------------------------------------------------------- engine


class InferenceEngine:
    """vLLM's AsyncLLM on a private asyncio loop thread; see the module docstring.

    >>> engine = InferenceEngine(InferenceSettings(model="/tmp/tiny"))  # doctest: +SKIP
    >>> engine.generate(prompt_ids, [], SamplingParams(n=2, max_tokens=16))  # doctest: +SKIP
    """

    def __init__(self, settings: InferenceSettings) -> None:
        if not settings.model:
            raise InvalidRequestError("model: no model given (AXPO_INFERENCE_MODEL or --model)")
        self.settings = settings
        self._model_dir = Path(settings.model)
        if not self._model_dir.is_dir():
            raise InvalidRequestError(f"model: {settings.model} is not a directory")
        config = json.loads((self._model_dir / "config.json").read_text())
        text = config.get("text_config", config)
        self.vocab_size = int(text["vocab_size"])
        self.tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        self.image_token_id: int | None = config.get("image_token_id")
        self.video_token_id: int | None = config.get("video_token_id")
        # Never sampled (a -100 logit bias): a vision placeholder the model writes has no image
        # behind it, so the next turn's prompt (and the learner's batch) would be invalid.
        self.unsampled_token_ids = sorted(
            {
                int(config[key])
                for key in (
                    "image_token_id",
                    "video_token_id",
                    "vision_start_token_id",
                    "vision_end_token_id",
                )
                if isinstance(config.get(key), int)
            }
        )
        self.weight_specs = read_safetensors_specs(self._model_dir)
        self._grid = _image_grid(self._model_dir)
        self._images = _ImageCache(settings.image_cache_size)
        self._version = settings.initial_policy_version
        self._stats: dict[str, float] = {"kv_cache_usage": 0.0}
        self.backend = "vllm"
        self.weight_loader = os.environ.get(WEIGHT_LOADER_ENV, "direct")
        if self.weight_loader not in ("direct", "vllm"):
            raise InvalidRequestError(
                f"{WEIGHT_LOADER_ENV}: {self.weight_loader!r}, expected 'direct' or 'vllm'"
            )
        self.last_swap_ms: dict[str, float] = {}
        self._worker_ms: dict[str, float] = {}
        self._closed = False
        self._llm: Any = None

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="axpo-inference-loop", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        on_cpu = current_platform.is_cpu()
        self.backend = "vllm-cpu" if on_cpu else "vllm"
        if on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(s.kv_cache_gib)))
        dtype = s.dtype if s.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
        args = AsyncEngineArgs(
            model=str(self._model_dir),
            dtype=dtype,
            max_model_len=s.max_model_len,
            block_size=s.block_size,
            enable_prefix_caching=s.enable_prefix_caching,
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            seed=s.seed,
            max_logprobs=max(s.max_top_logprobs, s.entropy_top_logprobs),
            logprobs_mode=s.logprobs_mode,
            limit_mm_per_prompt={"image": s.max_images_per_request, "video": 0},
            worker_extension_cls="axpo_inference.worker_ext.AxpoWorkerExtension",
            disable_log_stats=False,
            enable_log_requests=False,
        )
        self._gate = asyncio.Event()
        self._gate.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        self._swap_lock = asyncio.Lock()
        started = time.perf_counter()
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_make_kv_logger(self._stats)])
        log_event(
            _LOG,
            20,
            "engine started",
            model=str(self._model_dir),
            backend=self.backend,
            vllm=vllm.__version__,
            s=round(time.perf_counter() - started, 1),
        )

    def close(self) -> None:
        """Stop the engine and the loop thread. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        # Stop the loop first, so vLLM's output handler does not see its engine vanish.
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        # Then close it: vLLM's shutdown closes the client's ZMQ sockets on the loop when the
        # loop is open (a stopped loop never runs that callback) and directly when it is
        # closed. Sockets left open keep their context alive until the garbage collector
        # destroys it with an infinite linger, which hung a test session inside an unrelated
        # test when a message was still queued to the dead engine (2026-12-01 CI check).
        if not self._loop.is_running():
            self._loop.close()
        llm = self._llm
        if llm is not None:
            llm.shutdown()
            self._llm = None

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    # ------------------------------------------------------------------ properties

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        return self.settings.max_model_len

    def status(self) -> EngineStatus:
        async def depth() -> int:
            return int(self._llm.get_num_unfinished_requests())

        return EngineStatus(
            model=str(self._model_dir),
            backend=self.backend,
            policy_version=self._version,
            queue_depth=self._call(depth()),
            kv_cache_usage=min(1.0, max(0.0, self._stats["kv_cache_usage"])),
            max_model_len=self.settings.max_model_len,
            max_n=self.settings.max_n,
        )

    # ------------------------------------------------------------------ validation

    def _check_params(self, params: SamplingParams) -> None:
        s = self.settings
        if not 1 <= params.n <= s.max_n:
            raise InvalidRequestError(f"sampling.n: {params.n} outside [1, {s.max_n}]")
        if not (params.temperature >= 0 and math.isfinite(params.temperature)):
            raise InvalidRequestError(f"sampling.temperature: {params.temperature} must be >= 0")
        if not 0 < params.top_p <= 1:
            raise InvalidRequestError(f"sampling.top_p: {params.top_p} outside (0, 1]")
        if params.top_k < 0:
            raise InvalidRequestError(f"sampling.top_k: {params.top_k} must be >= 0 (0 is off)")
        if params.max_tokens < 1:
            raise InvalidRequestError(f"sampling.max_tokens: {params.max_tokens} must be >= 1")
        if not 0 <= params.top_logprobs <= s.max_top_logprobs:
            raise InvalidRequestError(
                f"sampling.top_logprobs: {params.top_logprobs} outside [0, {s.max_top_logprobs}]"
            )
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"sampling.stop_token_ids: {bad[0]} outside the vocabulary [0, {self.vocab_size})"
            )
        if any(not x for x in params.stop_strings):
            raise InvalidRequestError("sampling.stop_strings: empty string")

    def _check_ids(self, ids: Sequence[int], field: str) -> None:
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InvalidRequestError(
                    f"{field}[{i}]: token id {t} outside the vocabulary [0, {self.vocab_size})"
                )

    def decode_images(self, images: Sequence[Image]) -> list[Any]:
        """Decoded RGB PIL images; checks size limits before decoding, and the hash."""
        import hashlib

        from PIL import Image as PILImage

        s = self.settings
        if len(images) > s.max_images_per_request:
            raise InvalidRequestError(
                f"images: {len(images)} images, at most {s.max_images_per_request} per request"
            )
        out = []
        for i, image in enumerate(images):
            if not image.data:
                cached = self._images.get(image.sha256) if image.sha256 else None
                if cached is None:
                    raise InvalidRequestError(
                        f"images[{i}].data: empty and sha256 {image.sha256[:12]!r} is not held "
                        "by this server (send the bytes)"
                    )
                out.append(cached)
                continue
            if len(image.data) > s.max_image_bytes:
                raise InvalidRequestError(
                    f"images[{i}].data: {len(image.data)} bytes, limit {s.max_image_bytes}"
                )
            sha = hashlib.sha256(image.data).hexdigest()
            if image.sha256 and image.sha256 != sha:
                raise InvalidRequestError(f"images[{i}].sha256: does not match the data")
            cached = self._images.get(sha)
            if cached is not None:
                out.append(cached)
                continue
            try:
                with PILImage.open(io.BytesIO(image.data)) as img:
                    w, h = img.size
                    if w * h > s.max_image_pixels:
                        raise InvalidRequestError(
                            f"images[{i}]: {w}x{h} = {w * h} pixels, limit {s.max_image_pixels}"
                        )
                    decoded = img.convert("RGB")
            except InvalidRequestError:
                raise
            except Exception as exc:  # Pillow raises many types for corrupt data
                raise InvalidRequestError(
                    f"images[{i}].data: cannot decode image: {type(exc).__name__}: {exc}"
                ) from exc
            self._images.put(sha, decoded)
            out.append(decoded)
        return out

    def _expanded_length(self, ids: Sequence[int], pil_images: Sequence[Any]) -> int:
        if self._grid is None:
            return len(ids)
        factor, lo, hi = self._grid
        extra = sum(image_tokens(img.width, img.height, factor, lo, hi) - 1 for img in pil_images)
        return len(ids) + extra

    def _prepare(
        self,
        prompt_ids: Sequence[int],
        prefix_ids: Sequence[int],
        images: Sequence[Image],
        params: SamplingParams,
    ) -> tuple[list[int], list[Any]]:
        if not prompt_ids:
            raise InvalidRequestError("prompt_token_ids: empty prompt")
        self._check_ids(prompt_ids, "prompt_token_ids")
        self._check_ids(prefix_ids, "prefix_token_ids")
        self._check_params(params)
        ids = [*prompt_ids, *prefix_ids]
        if self.video_token_id is not None and self.video_token_id in ids:
            raise InvalidRequestError("prompt_token_ids: video placeholders are not supported")
        placeholders = ids.count(self.image_token_id) if self.image_token_id is not None else 0
        if placeholders != len(images):
            raise InvalidRequestError(
                f"images: {len(images)} image(s) for {placeholders} <|image_pad|> placeholder(s) "
                "(send one unexpanded placeholder per image)"
            )
        pil_images = self.decode_images(images)
        length = self._expanded_length(ids, pil_images)
        if length + params.max_tokens > self.settings.max_model_len:
            raise InvalidRequestError(
                f"sampling.max_tokens: prompt ({length} tokens with images expanded) + "
                f"max_tokens ({params.max_tokens}) exceeds max_model_len "
                f"({self.settings.max_model_len})"
            )
        return ids, pil_images

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompt_ids: Sequence[int], images: Sequence[Image], params: SamplingParams
    ) -> list[Sample]:
        """``params.n`` samples continuing ``prompt_ids`` (one unexpanded ``<|image_pad|>``
        per image). Raises InvalidRequestError naming the field for a bad request."""
        return list(self.generate_full(prompt_ids, images, params).samples)

    def resume_from_prefix(
        self,
        prompt_ids: Sequence[int],
        prefix_ids: Sequence[int],
        images: Sequence[Image],
        params: SamplingParams,
    ) -> list[Sample]:
        """``params.n`` continuations of prompt + frozen prefix; the prefix is not repeated.
        ``images`` are every image of prompt and prefix, in placeholder order."""
        return list(self.generate_full(prompt_ids, images, params, prefix_ids=prefix_ids).samples)

    def generate_full(
        self,
        prompt_ids: Sequence[int],
        images: Sequence[Image],
        params: SamplingParams,
        *,
        prefix_ids: Sequence[int] = (),
        request_id: str = "",
    ) -> GenerationResult:
        """Like :meth:`generate` (or a resume when ``prefix_ids``), with prompt statistics."""
        return self.submit(
            prompt_ids, images, params, prefix_ids=prefix_ids, request_id=request_id
        ).result()

    def submit(
        self,
        prompt_ids: Sequence[int],
        images: Sequence[Image],
        params: SamplingParams,
        *,
        prefix_ids: Sequence[int] = (),
        request_id: str = "",
    ) -> Future[GenerationResult]:
        """:meth:`generate_full` without waiting. A bad request raises here, at once.
        Cancelling the future aborts the request in vLLM (its sequences stop at the next
        engine step and free their KV blocks): the gRPC front cancels it when the client
        goes away (a speculative AXPO resample that is no longer needed)."""
        ids, pil_images = self._prepare(prompt_ids, prefix_ids, images, params)
        try:  # vLLM's own checks, before the request is queued
            self._vllm_params(params if params.temperature > 0 else replace(params, n=1))
        except ValueError as exc:
            raise InvalidRequestError(f"sampling: {exc}") from exc
        if self._closed:
            raise EngineDeadError("engine is closed")
        rid = f"{request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        return asyncio.run_coroutine_threadsafe(
            self._generate(ids, pil_images, images, params, rid), self._loop
        )

    def _vllm_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_tokens,
            stop_token_ids=list(params.stop_token_ids),
            stop=list(params.stop_strings),
            include_stop_str_in_output=True,
            seed=params.seed,
            logprobs=max(params.top_logprobs, self.settings.entropy_top_logprobs),
            output_kind=RequestOutputKind.FINAL_ONLY,
            skip_special_tokens=False,
            logit_bias=dict.fromkeys(self.unsampled_token_ids, -100.0) or None,
        )

    async def _generate(
        self,
        ids: list[int],
        pil_images: list[Any],
        images: Sequence[Image],
        params: SamplingParams,
        rid: str,
    ) -> GenerationResult:
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=ids)
        if pil_images:
            prompt["multi_modal_data"] = {"image": pil_images}
            prompt["multi_modal_uuids"] = {"image": [i.sha256 or None for i in images]}
        # vLLM refuses n > 1 with greedy sampling: send n identical single requests instead
        # (the prompt is computed once and shared through the prefix cache).
        copies = params.n if params.temperature == 0 and params.n > 1 else 1
        vparams = self._vllm_params(replace(params, n=params.n // copies))
        while not self._gate.is_set():  # a weight swap is under way: wait for the new weights
            await self._gate.wait()
        self._inflight += 1
        self._idle.clear()
        version = self._version  # no swap can start until this request has finished
        try:
            finals = await asyncio.gather(
                *(self._one(prompt, vparams, f"{rid}-{i}") for i in range(copies))
            )
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        outputs = [c for f in finals for c in sorted(f.outputs, key=lambda c: c.index)]
        samples = tuple(self._sample(c, params, version) for c in outputs)
        prompt_len = len(finals[0].prompt_token_ids or ids)
        cached = min(int(f.num_cached_tokens or 0) for f in finals)
        return GenerationResult(samples, prompt_len, cached)

    async def _one(self, prompt: Any, vparams: Any, rid: str) -> Any:
        final = None
        try:
            async for out in self._llm.generate(prompt, vparams, rid):
                final = out
        except ValueError as exc:  # vLLM's own input checks (e.g. an image it rejects)
            raise InvalidRequestError(f"request: {exc}") from exc
        except Exception as exc:
            if self._llm.errored:
                raise EngineDeadError(f"vLLM engine died: {exc}") from exc
            raise
        if final is None:
            raise EngineDeadError(f"request {rid}: vLLM returned no output")
        return final

    def _sample(self, out: Any, params: SamplingParams, version: int) -> Sample:
        token_ids = tuple(int(t) for t in out.token_ids)
        k = params.top_logprobs
        logprobs: list[float] = []
        entropies: list[float] = []
        top_ids: list[int] = []
        top_lps: list[float] = []
        for pos, tok in enumerate(token_ids):
            entry = out.logprobs[pos] if out.logprobs is not None else {}
            ranked = sorted(
                ((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None),
                key=lambda r: (r[0], -r[2]),
            )
            sampled = entry.get(tok)
            logprobs.append(float(sampled.logprob) if sampled is not None else float("nan"))
            topn = [r for r in ranked if r[0] <= self.settings.entropy_top_logprobs] or ranked
            entropies.append(topk_entropy([r[2] for r in topn]))
            if k:
                head = [r for r in ranked if r[0] <= k][:k]
                for _, tid, lp in head:
                    top_ids.append(int(tid))
                    top_lps.append(float(lp))
                for _ in range(k - len(head)):  # fewer candidates than k (tiny vocabularies)
                    top_ids.append(-1)
                    top_lps.append(float("-inf"))
        reason = FinishReason.LENGTH
        stop_string = ""
        if out.finish_reason == "stop":
            if isinstance(out.stop_reason, str):
                reason, stop_string = FinishReason.STOP_SEQUENCE, out.stop_reason
            elif isinstance(out.stop_reason, int) and out.stop_reason in params.stop_token_ids:
                reason = FinishReason.STOP_SEQUENCE
            else:
                reason = FinishReason.STOP
        elif out.finish_reason == "abort":
            reason = FinishReason.ABORT
        return Sample(
            token_ids=token_ids,
            scores=TokenScores(
                logprobs=tuple(logprobs),
                entropies=tuple(entropies),
                top_k=k,
                top_token_ids=tuple(top_ids),
                top_logprobs=tuple(top_lps),
            ),
            finish_reason=reason,
            policy_version=version,
            stop_string=stop_string,
        )

    # ------------------------------------------------------------------ weights

    def check_version(self, version: int) -> None:
        if version <= self._version:
            raise PreconditionError(
                f"policy_version: {version} does not increase the serving version {self._version}"
            )

    def load_weights_from_path(self, path: str | Path, version: int) -> LoadResult:
        """Swap in the safetensors at ``path`` (a directory or one file) as ``version``.

        Follows the swap rule of the module docstring. Raises PreconditionError for a version
        that does not increase or a drain that timed out, InvalidRequestError for weights that
        do not match the serving model (names, shapes, dtypes); neither touches the engine.
        ``LoadResult.stages_ms`` (also logged) says where the time went.
        """
        started = time.perf_counter()
        self.check_version(version)
        src = Path(path)
        if not src.exists():
            raise InvalidRequestError(f"path: {path} does not exist")
        specs = read_safetensors_specs(src)
        check_weights(self.weight_specs, specs)
        validated = time.perf_counter()
        tmp: Path | None = None
        if self.weight_loader == "vllm" and src.is_file():
            # vLLM's disk loader reloads from a directory: give the file one of its own
            tmp = Path(tempfile.mkdtemp(prefix="axpo-weights-"))
            (tmp / "model.safetensors").symlink_to(src.resolve())
            src = tmp
        try:
            stages = self._call(self._swap(str(src), version))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        ms = (time.perf_counter() - started) * 1000
        stages = {"validate_ms": (validated - started) * 1000, **stages}
        self.last_swap_ms = stages
        log_event(
            _LOG,
            20,
            "weights loaded",
            version=version,
            tensors=len(specs),
            ms=round(ms, 1),
            loader=self.weight_loader,
            **{k: round(v, 2) for k, v in stages.items()},
        )
        return LoadResult(version, len(specs), ms, stages_ms=stages)

    def load_weights_from_tensors(
        self, tensors: Iterable[tuple[str, Any]], version: int
    ) -> LoadResult:
        """Swap in ``(name, torch.Tensor)`` pairs (a whole state dict) as ``version``.

        The tensors go through a safetensors file in a temporary directory and the same path
        reload: handing tensors to vLLM's workers directly kills the CPU engine (PLATFORM.md).
        """
        started = time.perf_counter()
        self.check_version(version)
        specs: dict[str, TensorSpec] = {}
        buffers: dict[str, bytes] = {}
        for name, tensor in tensors:
            dtype = str(tensor.dtype).removeprefix("torch.")
            specs[name] = TensorSpec(name, tuple(tensor.shape), dtype)
            check_weights(
                {name: self.weight_specs[name]} if name in self.weight_specs else {},
                {name: specs[name]},
            )
            if dtype not in _ITEMSIZE:
                continue
            flat = tensor.detach().contiguous().cpu().reshape(-1)
            if dtype == "bfloat16":
                import torch

                buffers[name] = flat.view(torch.int16).numpy().tobytes()
            else:
                buffers[name] = flat.numpy().tobytes()
        check_weights(self.weight_specs, specs)
        out = Path(tempfile.mkdtemp(prefix="axpo-weights-"))
        try:
            write_safetensors(out / "model.safetensors", specs, buffers)
            result = self.load_weights_from_path(out, version)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        ms = (time.perf_counter() - started) * 1000
        return LoadResult(result.policy_version, result.tensors_loaded, ms)

    def stream_assembler(self, version: int, tensor_count: int) -> WeightStreamAssembler:
        """An assembler for a streamed load (checks the version up front)."""
        self.check_version(version)
        if tensor_count != len(self.weight_specs):
            raise InvalidRequestError(
                f"header.tensor_count: {tensor_count}, the model has {len(self.weight_specs)} "
                "tensors (a load must carry the whole state dict)"
            )
        return WeightStreamAssembler(self.weight_specs, tensor_count)

    async def _swap(self, path: str, version: int) -> dict[str, float]:
        """Drain, then swap (the module docstring's rule); returns stage times in ms."""
        stamps = [("start", time.perf_counter())]

        def mark(stage: str) -> None:
            stamps.append((stage, time.perf_counter()))

        async with self._swap_lock:
            if version <= self._version:  # re-checked: another swap may have won the race
                raise PreconditionError(
                    f"policy_version: {version} does not increase the serving version "
                    f"{self._version}"
                )
            self._gate.clear()
            self._worker_ms = {}
            try:
                try:
                    await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s)
                except TimeoutError as exc:
                    raise PreconditionError(
                        f"policy_version: {self._inflight} request(s) still in flight after "
                        f"{self.settings.drain_timeout_s} s; the old weights keep serving"
                    ) from exc
                mark("drain_ms")
                if self.weight_loader == "vllm":
                    await self._reload_vllm(path, mark)
                else:
                    await self._reload_direct(path, mark)
                self._version = version
            finally:
                self._gate.set()
        return {
            stage: (t - stamps[i][1]) * 1000 for i, (stage, t) in enumerate(stamps[1:])
        } | self._worker_ms

    async def _reload_vllm(self, path: str, mark: Any) -> None:
        """The generic path (``AXPO_WEIGHT_LOADER=vllm``): vLLM's public pause, its disk
        reload from a directory, then every cache reset as its own call."""
        llm = self._llm
        try:  # resume even when the pause itself fails
            await llm.pause_generation(mode="wait", clear_cache=True)
            mark("pause_ms")
            await llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            mark("reload_rpc_ms")
            await llm.collective_rpc("axpo_repack_lm_head")
            mark("repack_rpc_ms")
            await llm.reset_prefix_cache()
            mark("reset_prefix_ms")
            await llm.reset_encoder_cache()
            mark("reset_encoder_ms")
            await llm.reset_mm_cache()
            mark("reset_mm_ms")
        finally:
            await llm.resume_generation()
            mark("resume_ms")

    async def _reload_direct(self, path: str, mark: Any) -> None:
        """The default path: three engine-core calls.

        1. Clear the front end's multimodal input cache, then ``pause_scheduler(mode="wait",
           clear_cache=True)``: returns once the engine core is idle (our drain already
           emptied it; this also catches an aborted request the core has not dropped yet)
           and resets, in that one call, the prefix cache (refusing if a request still
           holds blocks), the encoder cache (scheduler and workers) and the multimodal
           input cache. These are what ``pause_generation`` does, without its fixed 20 ms
           sleep (there are no in-flight outputs to wait for after our drain). Clearing
           *before* the reload is safe: the scheduler is paused with nothing queued or
           running (new requests wait at our gate), so no step runs, and nothing can be
           cached from the old weights, until we resume after the reload.
        2. ``axpo_load_weights`` in the workers: the file straight into vLLM's in-place
           reload (mmap, no directory or symlink); on CPU the embedding tables are loaded
           straight into their live parameters (no meta round trip, fresh allocation and
           copy back), input embeddings are not re-packed (never used as a GEMM), and the
           output layer is re-packed once (``worker_ext``).
        3. ``resume_scheduler``.

        The encoder cache must be reset (the vision tower's weights change too, so cached
        image embeddings would be stale); the prefix cache likewise (KV from old weights).
        The multimodal input cache holds preprocessed pixels, which do not depend on the
        weights; it is cleared anyway because ``pause_scheduler(clear_cache=True)`` clears
        it in the core, and its front-end half must then be cleared with it (they are a
        pair: clearing one side only would make the core miss inputs).
        """
        llm = self._llm
        core = getattr(llm, "engine_core", None)
        renderer = getattr(llm, "renderer", None)
        try:  # resume even when the pause itself fails (e.g. a prefix reset refused)
            if core is None or renderer is None or not hasattr(core, "pause_scheduler_async"):
                # another vLLM layout: the public pause (same resets, plus its sleep)
                await llm.pause_generation(mode="wait", clear_cache=True)
            else:
                await renderer.clear_mm_cache_async()
                await core.pause_scheduler_async(mode="wait", clear_cache=True)
            mark("pause_and_reset_ms")
            (worker_ms, *_) = await llm.collective_rpc("axpo_load_weights", args=(path, self.tied))
            self._worker_ms = dict(worker_ms)
            mark("load_rpc_ms")
        finally:
            await llm.resume_generation()
            mark("resume_ms")
