"""``axpo sft``: supervised fine-tuning on a demonstration file, then a complete HF checkpoint.

:func:`train` reads and checks every demonstration first (:mod:`axpo_learner.sft.format`:
a malformed line fails before any model is loaded), then tokenizes and checks every line
against the model's tokenizer (:meth:`~axpo_learner.sft.rows.RowMaker.check`), then runs
``steps`` optimizer steps of ``batch_size`` demonstrations each: rows from
:mod:`axpo_learner.sft.rows` (the learner's image encoder and placeholder expansion), the loss
on assistant-written tokens only (:mod:`axpo_learner.sft.loss`, the system turn run once per
batch when the batch shares it), AdamW with linear warmup and cosine decay to
``lr * min_lr_ratio``, gradient-norm clipping.

The data order is a fixed function of the seed: a permutation of the demonstrations per epoch,
batches taken in turn across epoch boundaries, so step ``k``'s batch never depends on what ran
before. With ``save_every`` a training checkpoint (:mod:`axpo_learner.sft.state`) is written
every so many steps and after the last; ``resume`` restores the newest one and continues
bit-exactly (same weights as an uninterrupted run). The output is
:func:`axpo_learner.sft.export.export_checkpoint` of the trained weights (the input's dtype and
non-weight files), plus ``sft.json``: the settings and metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from axpo.settings.sft import SftSettings
from axpo_learner import distributed
from axpo_learner.batch import ImageEncoder
from axpo_learner.sft import state
from axpo_learner.sft.export import export_checkpoint, tensor_names
from axpo_learner.sft.format import Demonstration, SftInputError, load_demonstrations
from axpo_learner.sft.loss import demo_loss
from axpo_learner.sft.rows import RowMaker, SftRow
from axpo_learner.trainer import load_policy

log = logging.getLogger(__name__)

OnStep = Callable[[int, int, float], None]
"""Called after each optimizer step with (steps done, total steps, the step's loss)."""

CHECKPOINTS = "checkpoints"
MARKER = "sft.json"


class DataOrder:
    """Which demonstrations step ``k`` trains on: batches taken in turn from one seeded
    permutation per epoch (a batch may span two epochs)."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        self.count = count
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.count, generator=g).tolist()
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [
            self._perm(i // self.count)[i % self.count]
            for i in range(start, start + self.batch_size)
        ]

    def position(self, steps_done: int) -> dict[str, int]:
        """Epoch and offset of the next demonstration after ``steps_done`` steps."""
        seen = steps_done * self.batch_size
        return {"epoch": seen // self.count, "offset": seen % self.count}


def total_steps(settings: SftSettings, demos: int) -> int:
    """``settings.steps``, or the steps ``settings.epochs`` passes over ``demos`` take."""
    if settings.steps:
        return settings.steps
    return max(1, math.ceil(settings.epochs * demos / settings.batch_size))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate multiplier of step ``step`` (0-based): linear warmup over ``warmup``
    steps, then cosine decay from 1 to ``min_ratio`` at the last step.

    >>> [round(lr_factor(s, 10, 2, 0.1), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.135]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def default_warmup(total: int) -> int:
    return max(1, min(10, total // 10))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_out(out: Path, resume: bool) -> None:
    """Refuse to overwrite what is not ours, or to restart over checkpoints silently."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SftInputError(f"out {out}: exists and is not a directory")
    if state.list_checkpoints(out / CHECKPOINTS) and not resume:
        raise SftInputError(
            f"out {out}: holds training checkpoints of an earlier run; pass resume (--resume) "
            "to continue it, or choose another output directory"
        )
    if any(out.iterdir()) and not (out / MARKER).is_file() and not (out / CHECKPOINTS).is_dir():
        raise SftInputError(f"out {out}: exists and is not an axpo sft output (not replaced)")


class _Run:
    """One training run's model, optimizer and counters."""

    def __init__(self, settings: SftSettings, total: int, device: torch.device) -> None:
        self.settings = settings
        self.model, processor = load_policy(settings.model, settings.dtype)
        self.model.to(device)
        if not settings.train_vision and hasattr(self.model.model, "visual"):
            self.model.model.visual.requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=settings.lr,
            betas=settings.betas,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
        )
        warmup = default_warmup(total) if settings.warmup_steps is None else settings.warmup_steps
        self.warmup = warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, settings.min_lr_ratio)
        )
        tokenizer = getattr(processor, "tokenizer", processor)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        encoder = ImageEncoder.from_processor(processor)
        self.image_token_id = encoder.image_token_id if encoder is not None else -1
        self.rows = RowMaker(tokenizer, encoder)
        self.losses: list[float] = []
        self.counters = {"tokens": 0, "trained_tokens": 0, "demos_seen": 0, "tool_demos_seen": 0}

    def loss(self, rows: Sequence[SftRow]) -> torch.Tensor:
        return demo_loss(self.model, rows, pad_id=self.pad_id, image_token_id=self.image_token_id)

    def step(self, demos: Sequence[Demonstration]) -> float:
        rows = [self.rows.make(d) for d in demos]
        loss = self.loss(rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        self.optimizer.step()
        self.scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} (batch {[d.where for d in demos]})")
        self.losses.append(value)
        c = self.counters
        c["tokens"] += sum(r.length for r in rows)
        c["trained_tokens"] += sum(r.trained_tokens for r in rows)
        c["demos_seen"] += len(rows)
        c["tool_demos_seen"] += sum(d.tool_calls > 0 for d in demos)
        return value

    @torch.no_grad()
    def eval_loss(self, demos: Sequence[Demonstration]) -> float:
        """Mean cross-entropy per trained token over ``demos``."""
        was_training = self.model.training
        self.model.eval()
        total = weight = 0.0
        size = self.settings.batch_size
        for i in range(0, len(demos), size):
            rows = [self.rows.make(d) for d in demos[i : i + size]]
            tokens = sum(r.trained_tokens for r in rows)
            total += float(self.loss(rows)) * tokens
            weight += tokens
        self.model.train(was_training)
        return total / weight


def train(settings: SftSettings, on_step: OnStep | None = None) -> dict[str, Any]:
    """Train ``settings.model`` on ``settings.data`` and write ``settings.out``; returns the
    metrics (also in ``out/sft.json``). Raises
    :class:`~axpo_learner.sft.format.SftInputError` on bad input (its subclass
    :class:`~axpo_learner.sft.format.DemoFormatError` for the data), naming what is wrong."""
    started = time.perf_counter()
    model_dir, out = Path(settings.model), Path(settings.out)
    if not (model_dir / "config.json").is_file():
        raise SftInputError(f"model {model_dir}: not a checkpoint directory (no config.json)")
    weights, _ = tensor_names(model_dir)
    if not weights:
        raise SftInputError(f"model {model_dir}: no *.safetensors weights")
    if out.resolve() == model_dir.resolve():
        raise SftInputError(f"out {out}: is the input model; choose another output directory")
    _check_out(out, settings.resume)
    data = Path(settings.data)
    demos = load_demonstrations(data)
    evals = load_demonstrations(Path(settings.eval_data)) if settings.eval_data else []
    total = total_steps(settings, len(demos))
    device = distributed.resolve_device(settings.device, cuda_available=torch.cuda.is_available())
    order = DataOrder(len(demos), settings.batch_size, settings.seed)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        run = _Run(settings, total, device)
        missing = sorted(weights - run.model.state_dict().keys())
        if missing:  # found now, not when the trained weights are written
            raise SftInputError(
                f"model {model_dir}: the loaded model has no tensors named like the checkpoint's "
                f"(e.g. {missing[:3]}); it cannot be written back in the same layout"
            )
        for demo in [*demos, *evals]:  # every line's tokens, before the first step
            run.rows.check(demo)
        plan = {
            "model": str(model_dir.resolve()),
            "data_sha256": _sha256(data),
            "demos": len(demos),
            "steps": total,
            "batch_size": settings.batch_size,
            "seed": settings.seed,
            "lr": settings.lr,
            "min_lr_ratio": settings.min_lr_ratio,
            "warmup_steps": run.warmup,
            "train_vision": settings.train_vision,
            "dtype": settings.dtype,
        }
        start = 0
        ckpts = state.list_checkpoints(out / CHECKPOINTS) if settings.resume else []
        if ckpts:
            resumed = state.load(
                ckpts[-1],
                model=run.model,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                plan=plan,
            )
            start = resumed.step
            run.losses = resumed.losses
            run.counters.update(resumed.counters)
            log.info("resumed from %s (step %d of %d)", resumed.path, start, total)
        train_started = time.perf_counter()
        for step in range(start, total):
            loss = run.step([demos[i] for i in order.batch(step)])
            done = step + 1
            if settings.save_every and (done % settings.save_every == 0 or done == total):
                state.save(
                    out / CHECKPOINTS,
                    step=done,
                    model=run.model,
                    optimizer=run.optimizer,
                    scheduler=run.scheduler,
                    plan=plan,
                    position=order.position(done),
                    losses=run.losses,
                    counters=run.counters,
                    keep=settings.keep_checkpoints,
                )
            if on_step is not None:
                on_step(done, total, loss)
        train_s = time.perf_counter() - train_started
        eval_loss = run.eval_loss(evals) if evals else None
    metrics = _metrics(settings, run, demos, total, start, train_s, eval_loss, len(evals))
    run.model.eval()
    export_checkpoint(
        run.model.state_dict(),
        model_dir,
        out,
        extra={MARKER: json.dumps({"settings": settings.model_dump(), "metrics": metrics}) + "\n"},
        carry=(CHECKPOINTS,),
    )
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def _metrics(
    settings: SftSettings,
    run: _Run,
    demos: Sequence[Demonstration],
    total: int,
    start: int,
    train_s: float,
    eval_loss: float | None,
    eval_demos: int,
) -> dict[str, Any]:
    c = run.counters
    seen = max(1, c["demos_seen"])
    prefixes = {d.spans[0].text for d in demos}
    shared = len(run.rows.prefix(demos[0])) if len(prefixes) == 1 else 0
    out: dict[str, Any] = {
        "out": settings.out,
        "steps": total,
        "resumed_from_step": start,
        "first_loss": round(run.losses[0], 4) if run.losses else None,
        "last_loss": round(sum(run.losses[-10:]) / len(run.losses[-10:]), 4)
        if run.losses
        else None,
        "seconds_per_step": round(train_s / (total - start), 3) if total > start else None,
        "demos": len(demos),
        "demos_seen": c["demos_seen"],
        "tokens": c["tokens"],
        "trained_tokens": c["trained_tokens"],
        "tokens_per_demo": round(c["tokens"] / seen, 1),
        "shared_prefix_tokens": shared,
        "tool_demo_rate": round(c["tool_demos_seen"] / seen, 3),
        "device": str(next(run.model.parameters()).device),
    }
    if eval_loss is not None:
        out["eval_loss"] = round(eval_loss, 4)
        out["eval_demos"] = eval_demos
    return out
