"""Training checkpoints of ``axpo sft``, so an interrupted run continues bit-exactly.

``<out>/checkpoints/step-<step:08d>`` holds ``model.pt`` (the full state dict, in the training
dtype), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (torch's CPU and CUDA random states) and
``meta.json``: the step, the data position (epoch and offset of the next demonstration), the
losses so far, and the plan (data file hash, steps, batch size, ...) a resumed run must match.
Each is written into a temporary sibling directory, fsynced and renamed into place
(``os.replace``), ``meta.json`` last, so a crash leaves the whole checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axpo_learner.durable import fsync_dir, fsync_tree
from axpo_learner.sft.format import SftInputError

_META = "meta.json"


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint restored besides the tensors."""

    path: Path
    step: int
    losses: list[float]
    counters: dict[str, int]


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; stray temporaries are removed."""
    if not root.is_dir():
        return []
    for stray in root.glob(".tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    return sorted(p for p in root.glob("step-*") if (p / _META).is_file())


def _rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_file(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)


def save(
    root: Path,
    *,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    plan: Mapping[str, Any],
    position: Mapping[str, int],
    losses: list[float],
    counters: Mapping[str, int],
    keep: int,
) -> Path:
    """Write the training state after ``step`` steps atomically; keep the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        _save_file(model.state_dict(), tmp / "model.pt")
        _save_file(optimizer.state_dict(), tmp / "optimizer.pt")
        _save_file(scheduler.state_dict(), tmp / "scheduler.pt")
        _save_file(_rng(), tmp / "rng.pt")
        meta = {
            "step": step,
            "position": dict(position),
            "plan": dict(plan),
            "losses": losses,
            "counters": dict(counters),
        }
        (tmp / _META).write_text(json.dumps(meta) + "\n")
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path, device: torch.device | str = "cpu") -> Any:
    return torch.load(path, weights_only=True, map_location=device)


def load(
    path: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    plan: Mapping[str, Any],
) -> Resumed:
    """Restore the state saved at ``path`` into ``model``, ``optimizer`` and ``scheduler``
    (already built as for a fresh run). :class:`SftInputError` when the checkpoint's plan
    differs from ``plan`` (another data file, step count, batch size, ...), naming what
    differs."""
    meta = json.loads((path / _META).read_text())
    saved = meta["plan"]
    differ = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
    if differ:
        what = ", ".join(f"{k}: {saved.get(k)!r} then, {plan.get(k)!r} now" for k in differ)
        raise SftInputError(f"cannot resume from {path}: the run differs ({what})")
    device = next(model.parameters()).device
    model.load_state_dict(_load(path / "model.pt", device))
    optimizer.load_state_dict(_load(path / "optimizer.pt", device))
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    rng = _load(path / "rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return Resumed(path, int(meta["step"]), list(meta["losses"]), dict(meta["counters"]))
