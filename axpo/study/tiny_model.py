"""A tiny random-init Qwen3-VL checkpoint, built offline in seconds, for tests and the demo.

No model hub is reachable from any machine here, so tests cannot download a real checkpoint.
:func:`build_tiny_model` writes a directory with everything a real Qwen3-VL-Thinking checkpoint
has (config, safetensors weights, tokenizer, chat template, processor configs, generation
config), so the code under test loads it by the same path as a real one
(``AutoProcessor.from_pretrained(dir)``, ``AutoModelForImageTextToText.from_pretrained(dir)``,
``vllm.LLM(model=dir)``).

- Architecture: ``Qwen3VLForConditionalGeneration`` (text 256 wide × 2 layers, vision 128 wide ×
  2 blocks with deepstack on both), 3.9 M parameters (3.6 M with tied embeddings).
- Tokenizer and chat template: :mod:`axpo.study.tiny_tokenizer`.

torch, transformers and tokenizers are imported inside the functions (extra ``axpo[model]``),
so importing this module costs nothing.

>>> from pathlib import Path
>>> build_tiny_model(Path("/tmp/tiny-qwen3-vl"), seed=0)  # doctest: +SKIP
PosixPath('/tmp/tiny-qwen3-vl')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from axpo.study.tiny_tokenizer import (
    CHAT_TEMPLATE,
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    build_tokenizer,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "TAG_TOKENS",
    "build_tiny_model",
    "count_parameters",
]

# Image sizes the processor admits: from one merged token (32×32) to 256 tokens (512×512).
MIN_PIXELS = 32 * 32
MAX_PIXELS = 512 * 512

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    # vLLM interleaves the M-RoPE sections only when "mrope_interleaved" is set; transformers
    # always does. The sections (temporal, height, width) must sum to head_dim / 2.
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [12, 10, 10],
        "mrope_interleaved": True,
    },
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 256,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0, 1],
    "hidden_act": "gelu_pytorch_tanh",
}


# --------------------------------------------------------------------------- model


def _write_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """Write tokenizer.json plus a tokenizer_config.json naming Qwen's tokenizer class."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TEXT_CONFIG["max_position_embeddings"],
        # As in Qwen's tokenizer_config: all_special_tokens lists the <|...|> tokens too.
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _model_config(token_ids: dict[str, int], vocab_size: int, tie_word_embeddings: bool) -> Any:
    from transformers import Qwen3VLConfig

    text = {**TEXT_CONFIG, "vocab_size": vocab_size, "pad_token_id": token_ids[PAD_TOKEN]}
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(VISION_CONFIG),
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen3VLForConditionalGeneration"],
        dtype="float32",
    )


def _generation_config(token_ids: dict[str, int]) -> Any:
    """Qwen3-VL-Thinking's recommended sampling; stop at ``<|im_end|>`` or ``<|endoftext|>``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        eos_token_id=[token_ids[EOS_TOKEN], token_ids[PAD_TOKEN]],
        pad_token_id=token_ids[PAD_TOKEN],
    )


def _save_processor(out_dir: Path, max_pixels: int = MAX_PIXELS) -> None:
    """Load the tokenizer as transformers does and save it with Qwen3-VL's image and video
    processors as one Qwen3VLProcessor (chat template included)."""
    from transformers import (
        AutoTokenizer,
        Qwen2VLImageProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    pixels = {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}
    common = {
        "patch_size": VISION_CONFIG["patch_size"],
        "temporal_patch_size": VISION_CONFIG["temporal_patch_size"],
        "merge_size": VISION_CONFIG["spatial_merge_size"],
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, **common),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size=pixels, **common),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    # Loading recorded where the tokenizer came from; a checkpoint should not say.
    path = out_dir / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        saved.pop(key, None)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def build_tiny_model(
    out_dir: Path,
    seed: int = 0,
    *,
    tie_word_embeddings: bool = False,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_pixels: int = MAX_PIXELS,
) -> Path:
    """Build a random-init tiny Qwen3-VL checkpoint in ``out_dir`` (created) and return it.

    Deterministic: the same ``seed`` and options give byte-identical weights and tokenizer.
    The tokenizer does not depend on ``seed``. With ``tie_word_embeddings`` the output layer
    shares the input embedding (as small real Qwen checkpoints do) and the file has no
    separate ``lm_head`` tensor. ``max_pixels`` is the image processor's pixel budget: larger
    images are downscaled before the model sees them (as with a real checkpoint's budget), which
    is what makes zooming into the original worthwhile.
    """
    if not MIN_PIXELS <= max_pixels <= MAX_PIXELS:
        raise ValueError(f"max_pixels must be in [{MIN_PIXELS}, {MAX_PIXELS}], got {max_pixels}")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise here
    try:
        _build(out_dir, seed, tie_word_embeddings, vocab_size, max_pixels)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out_dir


def _build(
    out_dir: Path, seed: int, tie_word_embeddings: bool, vocab_size: int, max_pixels: int
) -> None:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    token_ids = {t: tokenizer.token_to_id(t) for t in (*SPECIAL_TOKENS, *TAG_TOKENS)}
    _write_tokenizer(tokenizer, out_dir)
    _save_processor(out_dir, max_pixels)

    # The embedding has vocab_size rows even where BPE learned fewer tokens (unused rows, as
    # in real Qwen checkpoints whose embedding is larger than their tokenizer).
    config = _model_config(token_ids, vocab_size, tie_word_embeddings)
    # Own generator state for the init, restored afterwards: building must not disturb the
    # caller's random streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = _generation_config(token_ids)
    model.save_pretrained(out_dir)


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in a checkpoint directory's ``*.safetensors`` files (read from their
    headers by the safetensors library; no torch needed). Tied weights count once, as stored."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                count = 1
                for dim in f.get_slice(name).get_shape():
                    count *= dim
                total += count
    return total
