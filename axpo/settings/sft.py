"""Settings of the supervised fine-tuning stage (``axpo sft``; the learner service runs it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from axpo.settings.base import MODEL_CONFIG


class SftSettings(BaseModel):
    """``axpo sft``: train a checkpoint on a demonstration file (loss on assistant tokens)."""

    model_config = MODEL_CONFIG

    model: Annotated[str, Field(min_length=1)]
    """Input checkpoint directory (any Qwen3-VL checkpoint with safetensors weights)."""
    data: Annotated[str, Field(min_length=1)]
    """Demonstration file (JSON lines; format: ``axpo_learner.sft.format``)."""
    out: Annotated[str, Field(min_length=1)]
    """Output directory: the trained model as a complete HF checkpoint, and its training
    checkpoints under ``checkpoints/step-<n>``."""
    eval_data: str = ""
    """Optional held-out demonstration file; its loss is reported at the end."""
    steps: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps; 0: as many as ``epochs`` passes over the data take."""
    epochs: Annotated[float, Field(gt=0)] = 1.0
    """Passes over the data when ``steps`` is 0 (fractions allowed)."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Demonstrations per optimizer step."""
    lr: Annotated[float, Field(gt=0)] = 1e-5
    """Peak AdamW learning rate."""
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """The cosine decay ends at ``lr * min_lr_ratio`` on the last step."""
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    """Linear warmup steps; unset: a tenth of the steps, at least 1 and at most 10."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: Annotated[float, Field(gt=0)] = 1e-8
    """AdamW epsilon."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW decoupled weight decay."""
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    seed: int = 0
    """Seed of the data order and of torch's random streams."""
    save_every: Annotated[int, Field(ge=0)] = 0
    """Write a training checkpoint every this many steps (and after the last); 0: none."""
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    """Newest training checkpoints kept."""
    resume: bool = False
    """Continue from the newest training checkpoint under ``out`` (bit-exact)."""
    train_vision: bool = False
    """Also train the vision tower (off: the format lives in the language model, and a
    frozen tower saves about a third of the step)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter and compute dtype while training; the output keeps the input's dtype."""
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    """``auto``: the GPU when CUDA is available, else the CPU; or ``cpu``, ``cuda``,
    ``cuda:N``."""

    @model_validator(mode="after")
    def _different_dirs(self) -> SftSettings:
        if self.out.rstrip("/") == self.model.rstrip("/"):
            raise ValueError("out must differ from model (the input checkpoint is read)")
        return self
