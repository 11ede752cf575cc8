"""``axpo bench learner --memory``: peak memory of one training micro-batch, old loss path vs new.

The model has Qwen3-VL-2B's text vocabulary (151,936) and hidden size (2,048; its MLP and
attention shapes too) but two decoder layers and the tiny vision tower, randomly initialised in
memory (nothing downloaded). One micro-batch is one sequence of L tokens, all of them trained
(the worst case for the loss), forward and backward, no optimizer step.

Paths: ``old`` is the loss as it was before the lean path: the model's logits at every
position, a float32 ``log_softmax`` over the whole vocabulary and the entropy from it (the
code is kept here, :func:`_old_token_logprobs`, as the baseline). ``new`` is
``axpo_learner.logprobs.token_logprobs`` with ``chunk_tokens`` positions at a time.

Each (length, path) runs in a fresh process. On a CUDA device the figure is
``torch.cuda.max_memory_allocated`` during the micro-batch minus the allocation before it; on
CPU it is the process's peak resident set (``VmHWM``, reset after the model is built) minus
its resident set before the micro-batch. Both include the parameters' gradients (~1.9 GiB
here, the same on both paths). A run that would not fit in the memory available is not
started: it is reported as skipped with the estimate that ruled it out.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

VOCAB = 151_936
TEXT = {  # Qwen3-VL-2B's text shapes, two layers
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}
LENGTHS = (1024, 4096, 8192)
PATHS = ("old", "new")


def _model(dtype: str) -> Any:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from axpo.study.tiny_model import TEXT_CONFIG, VISION_CONFIG

    text = {**TEXT_CONFIG, **TEXT, "vocab_size": VOCAB}
    text.pop("tie_word_embeddings")
    rope = dict(text["rope_parameters"])
    rope["mrope_section"] = [24, 20, 20]  # sums to head_dim / 2 = 64
    text["rope_parameters"] = rope
    vision = {**VISION_CONFIG, "out_hidden_size": TEXT["hidden_size"]}
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=TEXT["tie_word_embeddings"]
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.train()
    return model


def _old_token_logprobs(model: Any, batch: Any) -> tuple[Any, Any]:
    """The loss path before the lean one (kept as the baseline)."""
    import torch

    out = model(**batch.model_inputs(), use_cache=False)
    logits = out.logits[:, :-1].float() / 1.0
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``; Linux >= 4.0), so that building the
    model does not count; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_one(length: int, path: str, dtype: str, chunk_tokens: int, device: str) -> dict:
    """One micro-batch in this process; the peak memory it added, in MiB."""
    import torch

    from axpo_learner.batch import Row, collate
    from axpo_learner.logprobs import token_logprobs

    model = _model(dtype).to(device)
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(10, VOCAB - 10, (length,), generator=gen).tolist()
    row = Row("g", "t", tuple(ids), (False,) + (True,) * (length - 1), (-1.0,) * length, 1.0)
    mb = collate([row], pad_id=0).to(torch.device(device))
    mask = mb.loss_mask[:, 1:]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): no CPU figure")
        before = _rss_mib()
    if path == "old":
        logp, _ = _old_token_logprobs(model, mb)
    else:
        logp, _ = token_logprobs(model, mb, chunk_tokens=chunk_tokens, positions=mask)
    loss = -(logp * mask).sum() / mask.sum()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        peak = _peak_rss_mib() - before
    return {"length": length, "path": path, "peak_mib": round(peak, 1), "loss": float(loss)}


def _available_mib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 1024


def _estimate_mib(length: int, path: str, chunk_tokens: int) -> float:
    """A rough upper bound, to decide whether a run can start: the old path holds ~5 float32
    ``[L, vocab]`` tensors at once, the new one ~5 ``[chunk, vocab]``; plus weights and
    activations (~3 GiB)."""
    rows = length if path == "old" else min(chunk_tokens, length)
    return 5 * rows * VOCAB * 4 / 2**20 + 3072


def run(
    lengths: tuple[int, ...] = LENGTHS,
    *,
    dtype: str = "float32",
    chunk_tokens: int = 256,
    device: str = "",
) -> dict[str, Any]:
    """Every (length, path) in its own process; ``peak_mib`` per length and path and
    ``loss_path_ratio`` (new / old) per length where both ran."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: list[dict[str, Any]] = []
    for length in lengths:
        for path in PATHS:
            need = _estimate_mib(length, path, chunk_tokens)
            have = _available_mib() if device == "cpu" else float("inf")
            if need > 0.85 * have:
                results.append(
                    {
                        "length": length,
                        "path": path,
                        "skipped": f"needs ~{need / 1024:.0f} GiB, {have / 1024:.0f} available",
                    }
                )
                continue
            args = [str(length), path, dtype, str(chunk_tokens), device]
            code = (
                "import json, sys; from axpo_learner.memory_bench import measure_one; "
                "a = sys.argv[1:]; "
                "print(json.dumps(measure_one(int(a[0]), a[1], a[2], int(a[3]), a[4])))"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code, *args], capture_output=True, text=True
            )
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                results.append({"length": length, "path": path, "failed": tail[0]})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    peak = {(r["length"], r["path"]): r["peak_mib"] for r in results if "peak_mib" in r}
    ratio = {
        str(n): round(peak[(n, "new")] / peak[(n, "old")], 3)
        for n in lengths
        if (n, "new") in peak and (n, "old") in peak
    }
    return {
        "bench": "learner-memory",
        "model": {"vocab_size": VOCAB, **TEXT, "dtype": dtype},
        "device": device,
        "chunk_tokens": chunk_tokens,
        "runs": results,
        "peak_mib": {f"{n}/{p}": v for (n, p), v in peak.items()},
        "loss_path_ratio": ratio,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.now(UTC).date().isoformat(),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"learner memory, one micro-batch ({result['device']}, {result['model']['dtype']}):")
    for r in result["runs"]:
        what = r.get("peak_mib", r.get("skipped", r.get("failed")))
        print(f"  {r['length']:>6} tokens  {r['path']:<4} {what}")
    for n, v in result["loss_path_ratio"].items():
        print(f"  new / old at {n} tokens: {v}")
