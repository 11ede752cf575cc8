"""The inference engine: one vLLM ``AsyncLLM`` in-process, callable from many threads.

vLLM's async engine lives on an asyncio loop that this class runs in a background thread.
Every public method is synchronous and thread-safe: the gRPC server calls it from its worker
threads, each call becomes a coroutine on the loop, and vLLM batches whatever is in flight
(continuous batching across concurrent RPCs). Nothing here touches gRPC.

Prompts are token ids with one *unexpanded* ``<|image_pad|>`` per image (vLLM expands them from
the images: docs/platform.md, "Resuming from a token prefix").
:meth:`InferenceEngine.resume_from_prefix` sends prompt + frozen prefix in the same form, so
callers never see expanded placeholders; prefix caching makes the shared part nearly free.

Its parts, one file each: input images (:mod:`axpo_inference.images`), our sampling types to
vLLM's and back (:mod:`axpo_inference.sampling`), weight swaps and their rule
(:mod:`axpo_inference.weights`, the engine's base class), checkpoint files and weight checks
(:mod:`axpo_inference.checkpoint`), the KV-usage stat logger (:mod:`axpo_inference.stats`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from axpo.contracts.domain import Image, Sample, SamplingParams
from axpo.settings.inference import InferenceSettings
from axpo.telemetry.logs import get_logger, log_event
from axpo_inference.checkpoint import read_safetensors_specs
from axpo_inference.errors import EngineDeadError, InvalidRequestError
from axpo_inference.images import ImageCache, decode_images, expanded_length, image_grid
from axpo_inference.sampling import processing, to_sample, vllm_params
from axpo_inference.stats import make_kv_logger
from axpo_inference.weights import WEIGHT_LOADER_ENV, WeightSwap

# vLLM logs to stdout by default; keep stdout for the commands' own output (``--json``).
# Read when vllm is first imported (and inherited by its engine processes).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

T = TypeVar("T")
_LOG = get_logger("axpo.inference")


@dataclass(frozen=True)
class GenerationResult:
    samples: tuple[Sample, ...]
    prompt_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class EngineStatus:
    model: str
    backend: str
    policy_version: int
    queue_depth: int
    kv_cache_usage: float
    max_model_len: int
    max_n: int


class InferenceEngine(WeightSwap):
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
        self._grid = image_grid(self._model_dir)
        self._images = ImageCache(settings.image_cache_size)
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
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[make_kv_logger(self._stats)])
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
        return decode_images(images, self._images, self.settings)

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
        length = expanded_length(ids, pil_images, self._grid)
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
            vllm_params(
                params if params.temperature > 0 else replace(params, n=1),
                self.settings.entropy_top_logprobs,
                self.unsampled_token_ids,
            )
        except ValueError as exc:
            raise InvalidRequestError(f"sampling: {exc}") from exc
        if self._closed:
            raise EngineDeadError("engine is closed")
        rid = f"{request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        return asyncio.run_coroutine_threadsafe(
            self._generate(ids, pil_images, images, params, rid), self._loop
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
        vparams = vllm_params(
            replace(params, n=params.n // copies),
            self.settings.entropy_top_logprobs,
            self.unsampled_token_ids,
        )
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
        how = processing(params, self.unsampled_token_ids, self.settings.logprobs_mode)
        samples = tuple(
            to_sample(c, params, version, self.settings.entropy_top_logprobs, how) for c in outputs
        )
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
