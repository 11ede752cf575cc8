"""Methods added to every vLLM worker (``worker_extension_cls``); called by name through
``collective_rpc``. This module is imported inside vLLM's worker process."""

from __future__ import annotations

from typing import Any


class AxpoWorkerExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.model_runner``...)."""

    model_runner: Any

    def axpo_repack_lm_head(self) -> bool:
        """Re-derive the CPU backend's packed copy of the output layer from its weight.

        vLLM's CPU backend packs ``lm_head`` for its GEMM kernel at load time; an in-place
        reload updates the weight but, with tied embeddings, not the packed copy, so the model
        would keep the old output layer (PLATFORM.md). Re-running the dispatch is cheap and
        harmless for untied heads, so it runs after every reload on CPU. Returns whether it ran.
        """
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        model = self.model_runner.get_model()
        head = getattr(getattr(model, "language_model", model), "lm_head", None)
        if head is None or not hasattr(head, "weight"):
            return False
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
        return True
