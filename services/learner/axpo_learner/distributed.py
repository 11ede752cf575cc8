"""Multi-process training: torchrun process groups, FSDP2 sharding, data-parallel steps.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank holds a shard of each parameter
(``torch.distributed.fsdp.fully_shard``: one group per text decoder layer, the rest — embeddings,
the vision tower, the head — in the root group) and trains on its share of a step's
micro-batches. Every rank is given the *same* groups (see :func:`broadcast_object`), builds the
same rows and micro-batches, and computes the loss denominators over the whole step, so each
rank's loss is its part of the single-process loss. FSDP averages gradients across ranks, so
the backward pass runs on ``loss * world size`` (:func:`grad_scale`): the average of the scaled
gradients is their sum, the single-process gradient. (FSDP2's ``set_gradient_divide_factor(1)``
would do the same without the scaling, but it reduces with ``ReduceOp.PREMUL_SUM``, which gloo
does not support.)

Ranks must run the same number of forward/backward passes (each one all-gathers the shards):
a rank with fewer micro-batches than another runs a padding pass whose loss is multiplied by 0.

Vision blocks stay in the root group on purpose: a text-only micro-batch does not call them,
and a per-block group would all-gather only on the ranks whose micro-batch has images.

The rest of the service follows from "every rank runs the same collectives in the same order":
the loop (``axpo_learner.loop``) lets rank 0 alone talk to Redis and broadcasts each step's
groups and every stop decision; checkpoints are written by every rank, each its own shards
(``axpo_learner.checkpoint``); publication gathers the full weights to rank 0
(``Trainer.full_state_dict``), which alone sends them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Class-name suffixes of the modules that get an FSDP group of their own.
_LAYER_SUFFIXES = ("DecoderLayer",)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(setting: str, *, cuda_available: bool, local_rank: int = 0) -> torch.device:
    """The device a learner process trains on (``LearnerSettings.device``): ``auto`` is
    ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` is
    ``cuda:<local_rank>``; ``cpu`` and ``cuda:N`` are themselves. Asking for CUDA without it
    is an error naming the setting.

    >>> resolve_device("auto", cuda_available=False, local_rank=3)
    device(type='cpu')
    >>> resolve_device("auto", cuda_available=True, local_rank=3)
    device(type='cuda', index=3)
    """
    if setting == "auto":
        setting = "cuda" if cuda_available else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not setting.startswith("cuda"):
        raise ValueError(f"device: {setting!r} is not one of auto, cpu, cuda, cuda:N")
    if not cuda_available:
        raise ValueError(f"device: {setting!r} asked for, but CUDA is not available here")
    return torch.device(setting if ":" in setting else f"cuda:{local_rank}")


def init_from_env(device: str = "auto") -> World:
    """The process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and this process's device
    (:func:`resolve_device`): ``nccl`` on a CUDA device, else ``gloo``. Without ``WORLD_SIZE``
    > 1 no process group is initialised and a one-process world is returned."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    where = resolve_device(device, cuda_available=torch.cuda.is_available(), local_rank=local)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if size <= 1:
        return World(device=where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, device=where)


def shard_model(
    model: torch.nn.Module,
    *,
    device_type: str | None = None,
    offload: Any = None,
    mixed_bf16: bool = False,
) -> torch.nn.Module:
    """Apply FSDP2 to ``model`` in place: each decoder layer, then the root (gradients are
    averaged across ranks: scale the loss by :func:`grad_scale`). The mesh is on this
    process's device type (``device_type``, default the model's: ``cuda`` with NCCL, ``cpu``
    with gloo); ``offload`` (an FSDP2 ``CPUOffloadPolicy``) keeps the shards in host memory,
    the model then staying there. ``mixed_bf16``: float32 shards (the master weights),
    gathered as bfloat16 for compute, gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = device_type or next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = offload if offload is not None else OffloadPolicy()
    mp = MixedPrecisionPolicy()
    if mixed_bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in list(model.modules()):
        if type(module).__name__.endswith(_LAYER_SUFFIXES):
            fully_shard(module, mesh=mesh, offload_policy=policy, mp_policy=mp)
    fully_shard(model, mesh=mesh, offload_policy=policy, mp_policy=mp)
    return model


def place_reference(
    model: torch.nn.Module, world: World, placement: str, *, mixed_bf16: bool = False
) -> torch.nn.Module:
    """Put the KL reference (a frozen copy of the policy, on the host) where ``placement``
    says. ``device``: on the learner's device, and under torchrun sharded like the policy
    (:func:`shard_model`), so a rank holds 1/world of it. ``host``: under torchrun, sharded
    and kept in pinned host memory by FSDP2's ``CPUOffloadPolicy`` (each layer is copied to
    the device for its forward only); on a CPU device the host is the device. One process on
    a GPU cannot offload (FSDP2 needs a process group): a clear error says so. ``mixed_bf16``:
    computes in bfloat16 like a ``bf16-mixed`` policy."""
    device = world.device
    if placement == "device" or device.type == "cpu":
        model.to(device)
        if world.distributed:
            shard_model(model, mixed_bf16=mixed_bf16)
        return model
    if placement != "host":
        raise ValueError(f"reference_placement: unknown placement {placement!r}")
    if not world.distributed:
        raise ValueError(
            "reference_placement: host offloads the reference through FSDP2, which needs "
            "torchrun with 2 or more processes; in one process use device"
        )
    from torch.distributed.fsdp import CPUOffloadPolicy

    offload = CPUOffloadPolicy(pin_memory=True)
    shard_model(model, device_type=device.type, offload=offload, mixed_bf16=mixed_bf16)
    return model


def grad_scale(world: World) -> float:
    """The factor on each rank's loss that turns FSDP's gradient average into a sum."""
    return float(world.size)


def share(items: Sequence[T], world: World) -> list[tuple[T, bool]]:
    """This rank's share of ``items`` (round robin), padded so that every rank gets the same
    count: ``(item, live)``; a padding entry repeats ``items[0]`` with ``live`` False."""
    if not world.distributed:
        return [(x, True) for x in items]
    if not items:
        return []
    n = -(-len(items) // world.size)
    mine: list[tuple[T, bool]] = [(x, True) for x in items[world.rank :: world.size]]
    return mine + [(items[0], False)] * (n - len(mine))


def gather_object(obj: T, world: World) -> list[T]:
    """``obj`` from every rank, in rank order (every rank gets the list)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, world: World, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (e.g. the groups of a step read by rank 0)."""
    if not world.distributed:
        return obj
    box: list[Any] = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[no-any-return]


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when ``flag`` is True on any rank (e.g. a stop request that only
    one rank received)."""
    if not world.distributed:
        return flag
    return any(gather_object(flag, world))


def barrier(world: World) -> None:
    """Wait until every rank gets here."""
    if world.distributed:
        dist.barrier()


def shutdown() -> None:
    """Destroy the default process group, when there is one (the end of a torchrun worker)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def full_value(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (e.g. the grad norm over sharded gradients)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)
