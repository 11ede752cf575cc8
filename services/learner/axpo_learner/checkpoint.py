"""Atomic learner checkpoints: model, optimizer, scheduler, RNG states, step, policy version
and the queue entry ids consumed since the start of the run.

A checkpoint is the directory ``<root>/step-<step:08d>``. It is written into a temporary
sibling directory, every file fsynced, then renamed into place with ``os.replace`` and the
root fsynced, so a crash leaves either the whole checkpoint or none (stray ``.tmp-*``
directories are ignored and removed). ``meta.json`` is written last inside the temporary
directory; a directory without it is not a checkpoint.

The queue contract (axpo.queue): acknowledge entries only after the checkpoint that contains
their update is durable, i.e. after :func:`save` returns.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axpo_learner.trainer import Trainer

_META = "meta.json"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    policy_version: int
    consumed_entry_ids: tuple[str, ...]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, obj: Any) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save(
    trainer: Trainer, root: str | Path, consumed_entry_ids: Sequence[str] = (), keep: int = 2
) -> CheckpointInfo:
    """Write the trainer's state as ``<root>/step-<step>`` atomically; keep the newest
    ``keep`` checkpoints. Returns where it went."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{trainer.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        _write(tmp / "model.pt", trainer.model.state_dict())
        _write(tmp / "optimizer.pt", trainer.optimizer.state_dict())
        _write(tmp / "scheduler.pt", trainer.scheduler.state_dict())
        _write(tmp / "rng.pt", _rng_state())
        meta = {
            "step": trainer.step,
            "policy_version": trainer.policy_version,
            "consumed_entry_ids": list(consumed_entry_ids),
        }
        with (tmp / _META).open("w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return CheckpointInfo(final, trainer.step, trainer.policy_version, tuple(consumed_entry_ids))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; removes stray temporaries."""
    root = Path(root)
    if not root.is_dir():
        return []
    for stray in root.glob(".tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    found = [p for p in root.glob("step-*") if (p / _META).is_file()]
    return sorted(found, key=lambda p: p.name)


def load(trainer: Trainer, path: str | Path) -> CheckpointInfo:
    """Restore ``trainer`` exactly from the checkpoint at ``path``."""
    path = Path(path)
    meta = json.loads((path / _META).read_text())
    trainer.model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    # Python's RNG state is a tuple of ints; numpy's holds an ndarray: not weights-only safe.
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    trainer.step = int(meta["step"])
    trainer.policy_version = int(meta["policy_version"])
    return CheckpointInfo(
        path, trainer.step, trainer.policy_version, tuple(meta["consumed_entry_ids"])
    )


def load_latest(trainer: Trainer, root: str | Path) -> CheckpointInfo | None:
    """Restore the newest complete checkpoint under ``root``; None when there is none."""
    found = list_checkpoints(root)
    return load(trainer, found[-1]) if found else None
