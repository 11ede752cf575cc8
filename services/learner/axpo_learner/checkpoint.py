"""Atomic learner checkpoints: model, optimizer, scheduler, RNG states, step, policy version
and the queue entry ids consumed since the start of the run.

A checkpoint is the directory ``<root>/step-<step:08d>``. It is written into a temporary
sibling directory, every file fsynced, then renamed into place with ``os.replace`` and the
root fsynced, so a crash leaves either the whole checkpoint or none (stray ``.tmp-*``
directories are ignored and removed). ``meta.json`` is written last inside the temporary
directory; a directory without it is not a checkpoint.

Model and optimizer states are a ``torch.distributed.checkpoint`` (DCP) directory, ``state/``,
written through ``torch.distributed.checkpoint.state_dict`` (parameters and optimizer states
under their fully qualified names). Under FSDP2 every rank writes its own shards in parallel
(no rank ever holds the whole model or optimizer), and DCP reshards on load, so a checkpoint
written by 2 processes loads in 1 or in 4 (and the other way round). ``scheduler.pt``
(identical on every rank) comes from rank 0, ``rng.pt`` from rank 0 and ``rng-<rank>.pt``
from each other rank. Ranks must share the checkpoint directory (one node, or a shared file
system). A step's optimizer state exists only for parameters that have had a gradient (a
text-only run never steps the vision tower); loading leaves the others without state, as they
were, so the resumed run is bit-exact. Checkpoints of the earlier single-file format
(``model.pt``/``optimizer.pt``) still load in one process.

Next to the checkpoints, ``published.json`` records the newest weight version the learner has
tried to publish (:func:`record_published`, written before each publication), so that after a
restart the restored weights are published at a version the replicas accept.

The queue contract (axpo.queue): acknowledge entries only after the checkpoint that contains
their update is durable, i.e. after :func:`save` returns on rank 0.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axpo_learner import distributed
from axpo_learner.durable import fsync_dir, fsync_tree
from axpo_learner.trainer import Trainer

_META = "meta.json"
_STATE = "state"
_PUBLISHED = "published.json"


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


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def _write(path: Path, obj: Any) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _quiet_single_process(world: distributed.World) -> Iterator[None]:
    """DCP warns on every call without a process group; one process is intended here."""
    with warnings.catch_warnings():
        if not world.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(
    trainer: Trainer, root: str | Path, consumed_entry_ids: Sequence[str] = (), keep: int = 2
) -> CheckpointInfo:
    """Write the trainer's state as ``<root>/step-<step>`` atomically; keep the newest
    ``keep`` checkpoints. Returns where it went. Under torchrun every rank must call it (it is
    a collective); rank 0 creates, completes, renames and prunes, the checkpoint is durable
    when the call returns on rank 0."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    world = trainer.world
    leader = world.rank == 0
    root = Path(root)
    final = root / f"step-{trainer.step:08d}"
    tmp: Path | None = None
    if leader:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    tmp = distributed.broadcast_object(tmp, world)
    assert tmp is not None
    try:
        # An optimizer without state (nothing trained yet) gets one for every parameter here
        # (a zero-gradient step at lr 0); it is cleared again so that saving changes nothing.
        stateless = not trainer.optimizer.state
        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
        if stateless:
            trainer.optimizer.state.clear()
        with _quiet_single_process(world):
            dcp_save(
                {"model": model_state, "optimizer": optim_state},
                storage_writer=FileSystemWriter(tmp / _STATE, sync_files=True),
                no_dist=not world.distributed,
            )
        _write(tmp / _rng_file(world.rank), _rng_state())
        # Every rank's files are written (and fsynced) before rank 0 completes the checkpoint.
        distributed.barrier(world)
        if leader:
            _write(tmp / "scheduler.pt", trainer.scheduler.state_dict())
            meta = {
                "step": trainer.step,
                "policy_version": trainer.policy_version,
                "consumed_entry_ids": list(consumed_entry_ids),
                "world_size": world.size,
                "optimizer_state": not stateless,
            }
            with (tmp / _META).open("w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            fsync_tree(tmp)
            if final.exists():  # a re-save of the same step replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
    except BaseException:
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if leader:
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
    """Restore ``trainer`` exactly from the checkpoint at ``path`` (under torchrun: on every
    rank, a collective; the world size may differ from the one that wrote it)."""
    path = Path(path)
    meta = json.loads((path / _META).read_text())
    if (path / "model.pt").is_file():
        _load_single_file(trainer, path)
    else:
        _load_state(trainer, path / _STATE, optimizer_state=meta.get("optimizer_state", True))
    trainer.scheduler.load_state_dict(
        torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu")
    )
    rng = path / _rng_file(trainer.world.rank)
    # Python's RNG state is a tuple of ints; numpy's holds an ndarray: not weights-only safe.
    _set_rng_state(torch.load(rng if rng.is_file() else path / "rng.pt", weights_only=False))
    trainer.step = int(meta["step"])
    trainer.policy_version = int(meta["policy_version"])
    return CheckpointInfo(
        path, trainer.step, trainer.policy_version, tuple(meta["consumed_entry_ids"])
    )


def _load_state(trainer: Trainer, state_dir: Path, optimizer_state: bool) -> None:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    world = trainer.world
    reader = FileSystemReader(state_dir)
    saved = set(reader.read_metadata().state_dict_metadata)
    # A fresh optimizer gets a state for every parameter here (a zero-gradient step at lr 0);
    # the checkpoint overwrites those that had one when it was written, the rest are dropped
    # below.
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    missing = sorted(k for k in model_state if f"model.{k}" not in saved)
    if missing:
        raise ValueError(f"{state_dir}: not a checkpoint of this model (no {missing[:3]}...)")
    with _quiet_single_process(world):
        # Loads in place into the tensors of both state dicts.
        dcp_load(
            {"model": model_state, "optimizer": optim_state},
            storage_reader=reader,
            planner=DefaultLoadPlanner(allow_partial_load=True),
            no_dist=not world.distributed,
        )
    set_state_dict(
        trainer.model,
        trainer.optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
    )
    names: dict[torch.Tensor, list[str]] = {}
    for name, param in trainer.model.named_parameters(remove_duplicate=False):
        names.setdefault(param, []).append(name)
    for param in list(trainer.optimizer.state):
        had = any(f"optimizer.state.{n}.step" in saved for n in names.get(param, []))
        if not (had and optimizer_state):
            del trainer.optimizer.state[param]


def _load_single_file(trainer: Trainer, path: Path) -> None:
    """The earlier format: whole state dicts saved by one process."""
    if trainer.world.distributed:
        raise ValueError(f"{path}: a single-process checkpoint (model.pt) loads in one process")
    trainer.model.load_state_dict(
        torch.load(path / "model.pt", weights_only=True, map_location="cpu")
    )
    trainer.optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    )


def load_latest(trainer: Trainer, root: str | Path) -> CheckpointInfo | None:
    """Restore the newest complete checkpoint under ``root``; None when there is none. Under
    torchrun rank 0 picks the checkpoint, every rank loads it."""
    world = trainer.world
    found = list_checkpoints(root) if world.rank == 0 else []
    latest = distributed.broadcast_object(found[-1] if found else None, world)
    return load(trainer, latest) if latest is not None else None


def record_published(root: str | Path, version: int) -> None:
    """Durably note that weights of ``version`` are being published (atomic replace)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_PUBLISHED}.partial"
    with tmp.open("w") as f:
        json.dump({"version": version}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / _PUBLISHED)
    fsync_dir(root)


def last_published(root: str | Path) -> int | None:
    """The version :func:`record_published` last noted under ``root``; None when none."""
    try:
        return int(json.loads((Path(root) / _PUBLISHED).read_text())["version"])
    except FileNotFoundError:
        return None
