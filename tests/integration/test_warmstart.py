"""axpo_learner.warmstart on the tiny model: demonstrations render like rollouts, the loss
covers only the model's spans, the shared-prefix loss equals the full-row loss, and the saved
checkpoint loads like its input."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image as PILImage
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from axpo.contracts import chat
from axpo.contracts.domain import Image, ToolCall, ToolResult
from axpo.settings.job import DEFAULT_SYSTEM_PROMPT, TaskSpec
from axpo.study.tasks import generate_task
from axpo.study.tiny_model import build_tiny_model
from axpo_learner import warmstart
from axpo_learner.batch import ImageEncoder
from tests.integration.tool_specs import ZOOM_TOOL

pytestmark = pytest.mark.integration


def _crop(call: ToolCall, images: Sequence[Image]) -> ToolResult:
    """A stand-in for the zoom tool: the top-left 64x64 of the image (no tool server)."""
    assert call.name == "image_zoom_in_tool"
    args = json.loads(call.arguments_json)
    assert len(args["bbox_2d"]) == 4
    assert args["img_idx"] == 0
    with PILImage.open(io.BytesIO(images[0].data)) as img:
        crop = img.convert("RGB").crop((0, 0, 64, 64))
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return ToolResult(text="Zoomed in.", images=(Image.from_bytes(buf.getvalue(), "image/png"),))


def _names(model_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("ws") / "tiny", tie_word_embeddings=True)


def test_demo_renders_like_a_rollout_and_masks_only_model_spans() -> None:
    task = generate_task("zoom_digits", 5, 128)
    demo = warmstart.build_demo(
        task,
        tools=[ZOOM_TOOL],
        call_tool=_crop,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        use_tool=True,
        letter=task.gold,
        rng=random.Random(0),
    )
    text = "".join(s.text for s in demo.spans)
    assert text.startswith(chat.render_prompt(DEFAULT_SYSTEM_PROMPT, [ZOOM_TOOL], task.question, 1))
    trained = [s.text for s in demo.spans if s.train]
    assert trained[0].startswith("The box is too small")
    assert "</tool_call>" in trained[0]
    assert (
        trained[1]
        == f"The number is {task.answer_text}.\n</think>\n\n<answer>{task.gold}</answer><|im_end|>"
    )
    assert len(demo.images) == 2
    assert demo.images[0] == task.image
    calls = chat.parse_tool_calls("</think>\n\n" + trained[0].split("</think>\n\n", 1)[1])
    assert calls
    assert calls[0].ok
    direct = warmstart.build_demo(
        task,
        tools=[ZOOM_TOOL],
        call_tool=_crop,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        use_tool=False,
        letter="A",
        rng=random.Random(0),
    )
    assert [s.text for s in direct.spans if s.train] == [
        "I can answer directly.\n</think>\n\n<answer>A</answer><|im_end|>"
    ]
    assert direct.images == (task.image,)


def test_shared_prefix_loss_equals_full_rows(tiny: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny)
    model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32)
    encoder = ImageEncoder(processor)
    tok = processor.tokenizer
    prefix = tok(chat.render_system_turn("sys", [ZOOM_TOOL]), add_special_tokens=False)["input_ids"]
    rows = []
    for i, use_tool in enumerate((True, False, True)):
        task = generate_task("zoom_digits", i, 64)
        demo = warmstart.build_demo(
            task,
            tools=[ZOOM_TOOL],
            call_tool=_crop,
            system_prompt="sys",
            use_tool=use_tool,
            letter="B",
            rng=random.Random(i),
        )
        row = warmstart.prepare(demo, tok, encoder, prefix)
        # Only the model's spans are trained: their tokens decode to exactly those spans.
        trained = tok.decode([t for t, m in zip(row.token_ids, row.loss_mask, strict=True) if m])
        assert trained == "".join(s.text for s in demo.spans if s.train)
        rows.append(row)
    kw: dict[str, Any] = {"pad_id": tok.pad_token_id, "image_token_id": encoder.image_token_id}
    shared = warmstart.batch_loss(model, prefix, rows, **kw)
    full = warmstart.batch_loss(model, prefix, rows, share_prefix=False, **kw)
    assert torch.allclose(shared, full, rtol=1e-4, atol=1e-5)


def test_warm_start_trains_and_saves_a_loadable_checkpoint(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "warm"
    metrics = warmstart.warm_start(
        tiny,
        out,
        tools=[ZOOM_TOOL],
        call_tool=_crop,
        tasks=TaskSpec(count=8, image_size=64),
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        steps=20,
        batch_size=4,
        lr=3e-3,
    )
    assert metrics["steps"] == 20
    assert metrics["last_loss"] < 0.5 * metrics["first_loss"]
    assert 0.2 < metrics["tool_demo_rate"] < 0.8
    assert _names(out) == _names(tiny)
    assert "lm_head.weight" not in _names(out)  # tied embeddings stay tied
    non_weights = {p.name for p in tiny.iterdir() if not p.name.endswith(".safetensors")}
    assert non_weights <= {p.name for p in out.iterdir()}
    assert (out / "config.json").read_bytes() == (tiny / "config.json").read_bytes()

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    task = generate_task("zoom_digits", 100, 64)
    text = chat.render_prompt(DEFAULT_SYSTEM_PROMPT, [ZOOM_TOOL], task.question, image_count=1)
    image = PILImage.open(io.BytesIO(task.image.data)).convert("RGB")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    # 20 steps lower the loss but do not yet make greedy decoding follow the format (it takes
    # ~200 steps); this checks the checkpoint loads and generates with an image.
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 4
