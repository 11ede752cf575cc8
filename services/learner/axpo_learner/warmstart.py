"""A short supervised warm start, so RL starts from a model that follows the format.

A random-init model (the tiny test model) writes noise: RL on it would spend its steps learning
what a tool call looks like. :func:`warm_start` first teaches the *format* on generated
demonstrations of the :mod:`axpo.study.tasks` questions: think, optionally call
``image_zoom_in_tool`` with valid JSON and read the crop, then answer ``<answer>X</answer>``.

- About ``tool_rate`` of the demonstrations call the tool, the rest answer directly, so the
  warm-started model calls it in about that share of its rollouts.
- The demonstrated answer is the gold letter with probability ``answer_accuracy``, else a wrong
  letter: the tiny model cannot read the digits, and accuracy near chance leaves RL plenty of
  all-wrong tool-using groups to learn from.
- Demonstrations are rendered with :mod:`axpo.contracts.chat`, exactly as the rollout loop renders
  conversations, and tokenized span by span, so the loss covers precisely the model-written
  spans (thinking, the tool call, the answer and its ``<|im_end|>``), never the prompt, the
  template text or the tool responses.
- The tool call goes through ``call_tool`` (the tool server's ``Toolbox.call``), so the crops
  the model sees are the tool's real outputs.

The output directory is a complete checkpoint like the input (every non-weight file copied,
the same tensor names, the input's dtype), loadable by transformers and vLLM.

It belongs to the learner service (``axpo model warm-start`` loads it by name) and shares the
learner's image encoder and placeholder expansion (:mod:`axpo_learner.batch`). transformers is
imported inside the functions.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axpo.contracts import chat
from axpo.contracts.domain import Image, ToolCall, ToolResult
from axpo.settings.job import TaskSpec
from axpo.study.tasks import Task, choice_values, task_data, task_from_data
from axpo_learner.batch import ImageEncoder, expand_placeholders, moved

ZOOM_TOOL = "image_zoom_in_tool"
THINK_TOOL = "The box is too small to read. Let me zoom in.\n" + chat.THINK_CLOSE + "\n\n"
THINK_DIRECT = "I can answer directly.\n" + chat.THINK_CLOSE + "\n\n"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Span:
    """A piece of a demonstration's text; ``train`` marks the model-written pieces."""

    text: str
    train: bool


@dataclass(frozen=True)
class Demo:
    """One demonstration: text spans and the images of its placeholders, in order."""

    spans: tuple[Span, ...]
    images: tuple[Image, ...]
    uses_tool: bool
    letter: str


def answer_tail(number: str | None, letter: str) -> str:
    """The model's last text after thinking: the answer and the end of its turn."""
    think = f"The number is {number}.\n{chat.THINK_CLOSE}\n\n" if number is not None else ""
    return f"{think}<answer>{letter}</answer>{chat.IM_END}"


def padded_box(box: Sequence[int], rng: random.Random) -> list[int]:
    """``box`` (0-1000) grown by a random margin on each side, clamped to [0, 1000]."""
    x1, y1, x2, y2 = box
    return [
        max(0, x1 - rng.randrange(10, 60)),
        max(0, y1 - rng.randrange(10, 60)),
        min(1000, x2 + rng.randrange(10, 60)),
        min(1000, y2 + rng.randrange(10, 60)),
    ]


def build_demo(
    task: Task,
    *,
    tools: Sequence[Mapping[str, Any]],
    call_tool: Callable[[ToolCall, Sequence[Image]], ToolResult],
    system_prompt: str,
    use_tool: bool,
    letter: str,
    rng: random.Random,
) -> Demo:
    """The demonstration of ``task`` answering ``letter``, with or without a zoom call.

    The first span is the system turn (shared by every demonstration), the second the rest of
    the prompt: together exactly :func:`axpo.contracts.chat.render_prompt`.
    """
    spans = [
        Span(chat.render_system_turn(system_prompt, tools), False),
        Span(chat.render_user_turn(task.question, image_count=1) + chat.GENERATION_PROMPT, False),
    ]
    images = [task.image]
    if not use_tool:
        spans.append(Span(THINK_DIRECT + answer_tail(None, letter), True))
        return Demo(tuple(spans), (task.image,), False, letter)
    arguments = {"bbox_2d": padded_box(task.box_1000, rng), "label": "number box", "img_idx": 0}
    call = ToolCall("call_0", ZOOM_TOOL, json.dumps(arguments, ensure_ascii=False))
    result = call_tool(call, [task.image])
    images.extend(result.images)
    response = chat.render_tool_responses(
        [chat.ToolResponse(text=result.text, image_count=len(result.images))]
    )
    spans.append(Span(THINK_TOOL + chat.render_tool_call(ZOOM_TOOL, arguments), True))
    spans.append(Span(chat.END_OF_TURN + response + chat.GENERATION_PROMPT, False))
    spans.append(Span(answer_tail(choice_values(task)[letter], letter), True))
    return Demo(tuple(spans), tuple(images), True, letter)


def tokenize_spans(tokenizer: Any, spans: Sequence[Span]) -> tuple[list[int], list[bool]]:
    """Token ids (one ``<|image_pad|>`` per image) and the loss mask, span by span, so span
    boundaries are token boundaries (as in a rollout, where each turn is tokenized apart)."""
    ids: list[int] = []
    mask: list[bool] = []
    for span in spans:
        piece = tokenizer(span.text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([span.train] * len(piece))
    return ids, mask


@dataclass
class Row:
    """One demonstration after the shared prefix: expanded ids, loss mask, its images."""

    token_ids: list[int]
    loss_mask: list[bool]
    pixel_values: list[Any]
    image_grid_thw: list[Any]
    uses_tool: bool


def prepare(demo: Demo, tokenizer: Any, encoder: ImageEncoder, prefix_ids: Sequence[int]) -> Row:
    """Tokenize ``demo``, check it starts with ``prefix_ids`` (the system turn), drop them and
    expand the image placeholders of the rest (the learner's expansion,
    :func:`axpo_learner.batch.expand_placeholders`; expanded placeholders are never trained)."""
    ids, mask = tokenize_spans(tokenizer, demo.spans)
    p = len(prefix_ids)
    if ids[:p] != list(prefix_ids) or any(mask[:p]):
        raise ValueError("demonstration does not start with the shared system turn")
    ids, mask = ids[p:], mask[p:]
    if any(m for t, m in zip(ids, mask, strict=True) if t == encoder.image_token_id):
        raise ValueError("an image placeholder is inside a trained span")
    encoded = [encoder.encode(im.data) for im in demo.images]
    expanded, where = expand_placeholders(
        ids, encoder.image_token_id, [encoder.tokens(grid) for _, grid in encoded]
    )
    return Row(
        list(expanded),
        list(moved(mask, where, len(expanded), False)),
        [pv for pv, _ in encoded],
        [grid for _, grid in encoded],
        demo.uses_tool,
    )


def batch_loss(
    model: Any,
    prefix_ids: Sequence[int],
    rows: Sequence[Row],
    *,
    pad_id: int,
    image_token_id: int,
    share_prefix: bool = True,
) -> Any:
    """Mean cross-entropy over the trained tokens of ``rows`` (each preceded by
    ``prefix_ids``), differentiable.

    With ``share_prefix`` the prefix runs once (batch 1) and its KV cache is repeated for the
    rows: the same loss and gradients as running every full row (``share_prefix=False``), at a
    fraction of the cost when the prefix (system turn with the tool schemas) dominates.
    """
    import torch

    n = len(rows)
    p = len(prefix_ids)
    width = max(len(r.token_ids) for r in rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
        attention[i, : len(r.token_ids)] = 1
        loss_mask[i, : len(r.token_ids)] = torch.tensor(r.loss_mask, dtype=torch.bool)
    prefix = torch.tensor([list(prefix_ids)] * n, dtype=torch.long)
    full_ids = torch.cat([prefix, ids], dim=1)
    full_attention = torch.cat([torch.ones((n, p), dtype=torch.long), attention], dim=1)
    full_mm = ((full_ids == image_token_id) & full_attention.bool()).long()
    pixels = [pv for r in rows for pv in r.pixel_values]
    grids = [g for r in rows for g in r.image_grid_thw]
    images: dict[str, Any] = {}
    if pixels:
        images = {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}
    if not share_prefix:
        logits = model(
            input_ids=full_ids,
            attention_mask=full_attention,
            mm_token_type_ids=full_mm,
            **images,
        ).logits[:, p:-1]
        weights = loss_mask[:, 1:]
        return torch.nn.functional.cross_entropy(logits[weights].float(), ids[:, 1:][weights])
    cached = model.model(input_ids=prefix[:1], use_cache=True)
    cache = cached.past_key_values
    cache.batch_repeat_interleave(n)
    grid = images.get("image_grid_thw")
    positions, _ = model.model.get_rope_index(
        full_ids,
        mm_token_type_ids=full_mm,
        image_grid_thw=grid,
        attention_mask=full_attention,
    )
    hidden = model.model(
        input_ids=ids,
        attention_mask=full_attention,
        position_ids=positions[:, :, p:],
        past_key_values=cache,
        mm_token_type_ids=full_mm[:, p:],
        use_cache=False,
        **images,
    ).last_hidden_state
    # Position t of the rows predicts token t + 1; the first row token (the user turn's
    # <|im_start|>, never trained) would be predicted by the prefix. The output layer runs
    # only where a trained token is predicted.
    weights = loss_mask[:, 1:]
    targets = ids[:, 1:][weights]
    logits = model.get_output_embeddings()(hidden[:, :-1][weights])
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def _tensor_names(model_dir: Path) -> tuple[set[str], str | None]:
    """Tensor names in a checkpoint's safetensors files and the dtype of its first tensor."""
    from safetensors import safe_open

    names: set[str] = set()
    dtype: str | None = None
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            names.update(keys)
            if dtype is None and keys:
                dtype = str(f.get_slice(keys[0]).get_dtype())
    return names, dtype


def _is_weight(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES


def _save(model: Any, model_dir: Path, out_dir: Path, dtype: str | None) -> None:
    """Weights in the input's dtype, then every non-weight file of the input (so config,
    tokenizer, processor and generation configs are the input's own bytes)."""
    import torch

    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.is_file() and _is_weight(stale.name):
            stale.unlink()
    if dtype in torch_dtype:
        model.to(torch_dtype[dtype])
    model.save_pretrained(out_dir, safe_serialization=True)
    for path in model_dir.iterdir():
        if _is_weight(path.name):
            continue
        if path.is_dir():
            shutil.copytree(path, out_dir / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, out_dir / path.name)


def warm_start(
    model_dir: Path,
    out_dir: Path,
    *,
    tools: list[dict[str, Any]],
    call_tool: Callable[[ToolCall, Sequence[Image]], ToolResult],
    tasks: TaskSpec,
    system_prompt: str,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-3,
    tool_rate: float = 0.5,
    answer_accuracy: float = 0.5,
    seed: int = 0,
    train_vision: bool = False,
) -> dict[str, Any]:
    """Train ``model_dir`` on ``steps`` batches of demonstrations and save it to ``out_dir``.

    Returns metrics: steps, first_loss, last_loss (mean of the last 10 steps' losses),
    seconds, seconds_per_step, tokens_per_demo (after image expansion), tool_demo_rate.
    Raises ValueError on bad arguments or when the saved tensor names differ from the input's.
    """
    import torch
    import transformers
    from transformers.utils import logging

    # transformers is only partly annotated: use it untyped.
    hf: Any = transformers
    hf_logging: Any = logging

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not 0 <= tool_rate <= 1 or not 0 <= answer_accuracy <= 1:
        raise ValueError("tool_rate and answer_accuracy must be in [0, 1]")
    if model_dir.resolve() == out_dir.resolve():
        raise ValueError(f"out_dir must differ from model_dir ({model_dir})")
    if tool_rate > 0 and not any(t.get("function", {}).get("name") == ZOOM_TOOL for t in tools):
        raise ValueError(f"tool_rate > 0 needs the {ZOOM_TOOL} spec in tools")
    in_names, in_dtype = _tensor_names(model_dir)
    if not in_names:
        raise ValueError(f"{model_dir}: no *.safetensors weights")

    start = time.perf_counter()
    processor = hf.AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    encoder = ImageEncoder(processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        model.train()
        if not train_vision:  # the format lives in the language model; saves a third
            model.model.visual.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        warmup = max(1, min(10, steps // 10))

        def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
        task_cache: dict[int, Task] = {}
        prefix_ids = tokenizer(
            chat.render_system_turn(system_prompt, tools), add_special_tokens=False
        )["input_ids"]
        losses: list[float] = []
        tokens = 0
        demos = 0
        tool_demos = 0
        for _step in range(steps):
            rows = []
            for _ in range(batch_size):
                index = rng.randrange(tasks.count)
                if index not in task_cache:
                    task_cache[index] = task_from_data(task_data(tasks, index))
                task = task_cache[index]
                if rng.random() < answer_accuracy:
                    letter = task.gold
                else:
                    letter = rng.choice([c for c in task.choices if c != task.gold])
                demo = build_demo(
                    task,
                    tools=tools,
                    call_tool=call_tool,
                    system_prompt=system_prompt,
                    use_tool=rng.random() < tool_rate,
                    letter=letter,
                    rng=rng,
                )
                row = prepare(demo, tokenizer, encoder, prefix_ids)
                rows.append(row)
                tokens += len(prefix_ids) + len(row.token_ids)
                demos += 1
                tool_demos += row.uses_tool
            loss = batch_loss(
                model,
                prefix_ids,
                rows,
                pad_id=pad_id,
                image_token_id=encoder.image_token_id,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - start

    model.eval()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        _save(model, model_dir, out_dir, in_dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    out_names, _ = _tensor_names(out_dir)
    if out_names != in_names:
        raise ValueError(
            f"saved checkpoint's tensor names differ from the input's: missing "
            f"{sorted(in_names - out_names)[:5]}, extra {sorted(out_names - in_names)[:5]}"
        )
    return {
        "out": str(out_dir),
        "steps": steps,
        "first_loss": round(losses[0], 4),
        "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "seconds": round(time.perf_counter() - start, 2),
        "seconds_per_step": round(train_seconds / steps, 3),
        "tokens_per_demo": round(tokens / demos, 1),
        "shared_prefix_tokens": len(prefix_ids),
        "tool_demo_rate": round(tool_demos / demos, 3),
    }
