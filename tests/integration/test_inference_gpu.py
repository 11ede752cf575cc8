"""GPU-only: the same engine on the `vllm` (CUDA) distribution, bfloat16 by default. Skipped
cleanly on CPU machines."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_engine_serves_and_swaps_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from axpo.contracts.domain import SamplingParams
    from axpo.settings.inference import InferenceSettings
    from axpo.study.tiny_model import build_tiny_model
    from axpo_inference.engine import InferenceEngine

    model_dir = build_tiny_model(tmp_path / "tiny", seed=0, tie_word_embeddings=True)
    settings = InferenceSettings(
        model=str(model_dir), max_model_len=512, gpu_memory_utilization=0.3
    )
    with InferenceEngine(settings) as engine:
        assert engine.backend == "vllm"
        ids = [1, 2, 3, 4, 5]
        (before,) = engine.generate(ids, [], SamplingParams(temperature=0, max_tokens=8))
        state = load_file(str(model_dir / "model.safetensors"))
        save_file({k: v * 1.5 for k, v in state.items()}, str(tmp_path / "model.safetensors"))
        engine.load_weights_from_path(tmp_path / "model.safetensors", 1)
        (after,) = engine.generate(ids, [], SamplingParams(temperature=0, max_tokens=8))
        assert after.policy_version == 1
        assert len(after.token_ids) == 8
        assert before.policy_version == 0
