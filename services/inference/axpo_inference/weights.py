"""Weight swaps: new weights into the running engine without a restart.

The rule (:meth:`WeightSwap.load_weights_from_path`):

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

The gate, the in-flight count and the version are the engine's (its generation path admits
requests through them): :class:`WeightSwap` is a part of :class:`InferenceEngine`, kept in its
own file, and names below the engine state it uses.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axpo.settings.inference import InferenceSettings
from axpo.telemetry.logs import get_logger, log_event
from axpo_inference.checkpoint import (
    ITEMSIZE,
    TensorSpec,
    WeightStreamAssembler,
    check_weights,
    read_safetensors_specs,
    write_safetensors,
)
from axpo_inference.errors import InvalidRequestError, PreconditionError

_LOG = get_logger("axpo.inference")

# How weight swaps reach vLLM: "direct" (default: one worker call that reads the file and
# reloads in place, one pause that also resets the caches) or "vllm" (the generic path:
# vLLM's public pause, its disk reload, each cache reset a call of its own). The old path
# stays selectable to compare the two side by side (``axpo bench learner``) and as a
# fallback.
WEIGHT_LOADER_ENV = "AXPO_WEIGHT_LOADER"


@dataclass(frozen=True)
class LoadResult:
    policy_version: int
    tensors_loaded: int
    load_ms: float
    bytes_loaded: int = 0
    stages_ms: dict[str, float] = field(default_factory=dict)
    """Where the swap's time went (validate, drain, pause, load, resume...), in ms."""


class WeightSwap:
    """The weight-swap methods of :class:`InferenceEngine` (its base class); see the module
    docstring for the rule."""

    # The engine's state these methods use (set by InferenceEngine).
    settings: InferenceSettings
    weight_specs: dict[str, TensorSpec]  # the serving checkpoint's tensors
    weight_loader: str  # "direct" or "vllm" (WEIGHT_LOADER_ENV)
    tied: bool
    last_swap_ms: dict[str, float]
    _llm: Any  # vLLM's AsyncLLM
    _version: int
    _gate: asyncio.Event  # set: requests are admitted
    _idle: asyncio.Event  # set: no admitted request is in flight
    _inflight: int
    _swap_lock: asyncio.Lock
    _worker_ms: dict[str, float]
    _call: Callable[..., Any]  # runs a coroutine on the engine's loop and waits for it

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
        reload: handing tensors to vLLM's workers directly kills the CPU engine
        (docs/platform.md, "Reloading weights in place").
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
            if dtype not in ITEMSIZE:
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
