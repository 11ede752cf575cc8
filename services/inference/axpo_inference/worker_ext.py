"""Methods added to every vLLM worker (``worker_extension_cls``); called by name through
``collective_rpc``. This module is imported inside vLLM's worker process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _safetensors_files(path: str) -> list[Path]:
    src = Path(path)
    return sorted(src.glob("*.safetensors")) if src.is_dir() else [src]


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor of ``files``, read through safetensors' mmap (on
    CPU; the model's weight loaders copy them to the parameters' device)."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _noop(layer: Any) -> None:
    return None


@contextmanager
def _embeddings_loaded_in_place(model: Any, head: Any) -> Iterator[dict[str, int]]:
    """CPU only: while active, vLLM's in-place reload loads the embedding tables (input
    embeddings and output layer: usually the largest tensors by far) straight into their
    live parameters, and does not re-pack input embeddings.

    vLLM's generic reload (``reload/layerwise.py``) first moves every layer's parameters to
    the meta device, then, per layer, allocates fresh tensors, loads into them, runs the
    layer's post-load processing and copies the result back into the live tensors: for an
    embedding table that is a fresh allocation (page faults) and two full copies, where its
    kernel format *is* its checkpoint format. So before the reload each plain embedding
    module (``VocabParallelEmbedding`` or ``ParallelLMHead``, unquantized, ``weight`` its only
    tensor, not on meta) is marked as already set up for loading: the reload leaves its
    parameter live, the module's own ``weight_loader`` copies the checkpoint tensor into it
    (vocabulary sharding and padding as on the first load), and the reload's finalization runs
    its post-load processing on it, which on CPU re-packs the output layer for the GEMM kernel
    (tied or not: its weight is the live, now updated, tensor).

    Input embeddings (plain ``VocabParallelEmbedding``, not the head) are a table lookup on
    the weight; vLLM's CPU backend also packs them for its GEMM kernel, a copy nothing uses
    (only the output layer is a GEMM), so their post-load processing is skipped while active:
    their unused packed copy keeps the old values.

    Yields counts (``in_place``, ``not_packed``, ``head_in_place``: 1 when the output layer
    was among the in-place ones). Any other layer goes through the generic path unchanged.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    head_method = getattr(head, "quant_method", None)
    in_place: list[Any] = []
    not_packed: list[Any] = []
    head_in_place = False
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if type(module) not in (VocabParallelEmbedding, ParallelLMHead):
            continue
        if type(method) is not UnquantizedEmbeddingMethod or module._buffers:
            continue
        params = dict(module.named_parameters(recurse=False))
        weight = params.get("weight")
        if set(params) != {"weight"} or weight is None or weight.is_meta or weight.numel() == 0:
            continue
        info = get_layerwise_info(module)
        if info.can_load() or info.kernel_tensors is not None:
            continue  # not in the state we expect between reloads: leave it to vLLM
        in_place.append(info)
        head_in_place = head_in_place or module is head
        if (
            type(module) is VocabParallelEmbedding
            and module is not head
            and method is not (head_method)
        ):
            not_packed.append(method)
    for info in in_place:
        # "Already initialized": initialize_layerwise_reload skips it (no meta, no wrapped
        # loaders); finalize_layerwise_processing, finding nothing loaded through wrappers
        # and no saved kernel tensors, runs _layerwise_process on the live tensors: the
        # post-load processing, then info.reset().
        info.load_numel_total = 0
    for method in not_packed:
        method.process_weights_after_loading = _noop  # instance attribute, removed below
    try:
        yield {
            "in_place": len(in_place),
            "not_packed": len(not_packed),
            "head_in_place": int(head_in_place),
        }
    finally:
        for method in not_packed:
            del method.process_weights_after_loading
        for info in in_place:
            if info.can_load():  # the reload failed before finalizing: undo the mark
                info.reset()


class AxpoWorkerExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.model_runner``...)."""

    model_runner: Any

    def axpo_noop(self) -> float:
        """Nothing: the cost of a ``collective_rpc`` round trip (profiling)."""
        return time.perf_counter()

    def _axpo_head(self) -> Any:
        model = self.model_runner.get_model()
        return getattr(getattr(model, "language_model", model), "lm_head", None)

    def axpo_load_weights(self, path: str, tied: bool) -> dict[str, float]:
        """Load the safetensors at ``path`` (a file, or a directory of them) in place; returns
        the worker-side stage times in ms.

        The caller (the engine) has validated names, shapes and dtypes against the serving
        checkpoint and drained and paused the engine. The tensors go straight from the file
        (mmap) into vLLM's in-place reload (``weights_iterator``: the model's own name mapping
        and fused-shard loaders, and on CPU the re-packing of every linear layer), without
        vLLM's disk loader: no directory is needed, and ``model_config.model`` is not pointed
        at the publish directory (which the learner deletes later). On CPU the embedding
        tables are loaded straight into their live parameters and input embeddings are not
        re-packed (:func:`_embeddings_loaded_in_place`); the output layer is re-packed by the
        reload (in place, tied or not), else here when ``tied`` (docs/platform.md,
        "The stale tied lm_head"). GPU: vLLM's generic in-place reload unchanged (the loaders
        copy host tensors to the device; nothing is packed there).
        """
        from vllm.platforms import current_platform

        t0 = time.perf_counter()
        files = _safetensors_files(path)
        worker: Any = self  # vLLM's Worker.reload_weights (sets the current vLLM config)
        weights = _iter_safetensors(files)
        counts = {"in_place": 0, "not_packed": 0, "head_in_place": 0}
        head = self._axpo_head()
        if current_platform.is_cpu():
            model = self.model_runner.get_model()
            with _embeddings_loaded_in_place(model, head) as counts:
                worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        else:  # GPU: vLLM's generic in-place reload as it is
            worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        t1 = time.perf_counter()
        # A tied head's packed copy is stale after the generic reload (docs/platform.md,
        # "The stale tied lm_head"); loaded in place, the reload's finalization re-packed it
        # already.
        repacked = self.axpo_repack_lm_head() if tied and not counts["head_in_place"] else False
        t2 = time.perf_counter()
        return {
            "worker_reload_ms": (t1 - t0) * 1000,
            "worker_repack_ms": (t2 - t1) * 1000,
            "worker_repacked_head": float(repacked),
            "worker_embeddings_in_place": float(counts["in_place"]),
            "worker_embeddings_not_packed": float(counts["not_packed"]),
        }

    def axpo_repack_lm_head(self) -> bool:
        """Re-derive the CPU backend's packed copy of the output layer from its weight.

        vLLM's CPU backend packs ``lm_head`` for its GEMM kernel at load time; an in-place
        reload updates the weight but, with tied embeddings, not the packed copy, so the model
        would keep the old output layer (docs/platform.md, "The stale tied lm_head"). (An
        untied head is a checkpoint tensor of its own, so the reload re-packs it.) Returns
        whether it ran; GPU: nothing to do.
        """
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        head = self._axpo_head()
        if head is None or not hasattr(head, "weight"):
            return False
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
        return True
