"""A complete HF checkpoint from trained weights: what ``axpo sft`` and the RL learner's
``export_dir`` leave behind, loadable by transformers and vLLM like the input model.

:func:`export_checkpoint` writes exactly the input checkpoint's tensor names (a tied output
layer stays out, as in the input), in the input's dtype, as safetensors shards
(``huggingface_hub``'s split, with an index when there is more than one), then copies every
non-weight file of the input (config, tokenizer, processor, chat template, generation config:
the input's own bytes). It writes into a temporary sibling and renames it into place, so
``out_dir`` is always absent, the old checkpoint, or the whole new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from axpo_learner.durable import fsync_dir, fsync_tree

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# An ``axpo sft`` output's training state: not part of the model, never copied.
SKIPPED_DIRS = ("checkpoints",)
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def tensor_names(model_dir: Path) -> tuple[set[str], str | None]:
    """Tensor names in a checkpoint's safetensors files and the dtype of its first tensor
    (``F32``, ``BF16``, ...)."""
    from safetensors import safe_open

    names: set[str] = set()
    dtype: str | None = None
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            names.update(keys)
            if dtype is None and keys:
                dtype = str(f.get_slice(keys[0]).get_dtype())
    return names, dtype


def _tensors(
    state: Mapping[str, torch.Tensor], names: set[str], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The input's tensors from ``state``, on CPU in ``dtype``, never sharing storage."""
    missing = sorted(names - state.keys())
    if missing:
        raise ValueError(
            f"the trained weights lack {len(missing)} of the input checkpoint's tensors "
            f"(e.g. {missing[:3]}): not the same model or naming"
        )
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name in sorted(names):
        t = state[name].detach().to("cpu", dtype=dtype or state[name].dtype).contiguous()
        if t.data_ptr() in seen:  # tied tensors: safetensors stores each storage once
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard)
    for filename, names in split.filename_to_tensors.items():
        shard = {n: tensors[n] for n in names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_checkpoint(
    state: Mapping[str, torch.Tensor],
    model_dir: Path,
    out_dir: Path,
    *,
    extra: Mapping[str, str] | None = None,
    carry: tuple[str, ...] = (),
    max_shard: str = "5GB",
) -> Path:
    """Write ``state`` (a model's ``state_dict``, any dtype and device) as a complete HF
    checkpoint like ``model_dir`` to ``out_dir``, atomically; returns ``out_dir``.

    ``extra`` adds small text files (name -> content). The entries named in ``carry`` of an
    existing ``out_dir`` move into the new one (``axpo sft`` keeps its ``checkpoints``); a
    ``checkpoints`` folder of ``model_dir`` (an earlier ``axpo sft`` output's training state) is
    not copied. Raises ValueError when ``model_dir`` has no safetensors weights, when ``state``
    lacks one of its tensors, or when ``out_dir`` is ``model_dir``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"the export directory must differ from the input model ({model_dir})")
    names, dtype = tensor_names(model_dir)
    if not names:
        raise ValueError(f"{model_dir}: no *.safetensors weights to follow")
    tensors = _tensors(state, names, _DTYPES.get(dtype or ""))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is read by others
    try:
        _write_weights(tensors, tmp, max_shard)
        for path in model_dir.iterdir():
            if is_weight_file(path.name) or (path.name in SKIPPED_DIRS and path.is_dir()):
                continue
            if path.is_dir():
                shutil.copytree(path, tmp / path.name)
            else:
                shutil.copy2(path, tmp / path.name)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The swap: renames only. Nothing is deleted before the new checkpoint is in place.
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        for name in carry:
            if (old / out_dir.name / name).exists():
                os.replace(old / out_dir.name / name, tmp / name)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
