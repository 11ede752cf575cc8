"""``axpo sft`` on the tiny model: the loss falls on a small repeated data set, the output is a
complete checkpoint transformers loads, an interrupted run resumed from its checkpoint ends
with the very weights of an uninterrupted one, the shared-prefix loss equals full rows, and
bad input is a usage error that says what is wrong."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from axpo.cli.main import main
from axpo.contracts.domain import Image, ToolCall, ToolResult
from axpo.settings.job import DEFAULT_SYSTEM_PROMPT, TaskSpec
from axpo.settings.sft import SftSettings
from axpo.study.tiny_model import build_tiny_model
from axpo_learner import warmstart
from axpo_learner.batch import ImageEncoder
from axpo_learner.sft import train as sft_train
from axpo_learner.sft.format import SftInputError, load_demonstrations
from axpo_learner.sft.loss import batch_loss, demo_loss
from axpo_learner.sft.rows import RowMaker
from tests.integration.tool_specs import ZOOM_TOOL

pytestmark = pytest.mark.integration


def _crop(call: ToolCall, images: Sequence[Image]) -> ToolResult:
    """A stand-in for the zoom tool: the top-left 64x64 of the image (no tool server)."""
    with PILImage.open(io.BytesIO(images[0].data)) as img:
        crop = img.convert("RGB").crop((0, 0, 64, 64))
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return ToolResult(text="Zoomed in.", images=(Image.from_bytes(buf.getvalue(), "image/png"),))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("sft") / "tiny", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four demonstrations (two call the zoom tool) of 64-pixel tasks."""
    path = tmp_path_factory.mktemp("sft-data") / "train.jsonl"
    warmstart.write_demos(
        path,
        4,
        tools=[ZOOM_TOOL],
        call_tool=_crop,
        tasks=TaskSpec(count=4, image_size=64),
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        tool_rate=0.5,
        answer_accuracy=1.0,
        seed=0,
    )
    return path


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _sft(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["sft", *args, "--json", "--no-progress"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_sft_lowers_the_loss_and_writes_a_checkpoint_transformers_loads(
    tiny: Path, demos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    metrics = _sft(
        capsys,
        *("--model", str(tiny), "--data", str(demos), "--out", str(out)),
        *("--eval-data", str(demos), "--epochs", "10", "--batch-size", "4", "--lr", "5e-3"),
    )
    assert metrics["steps"] == 10  # 10 epochs of 4 demonstrations, 4 per step
    assert metrics["demos"] == 4
    assert metrics["demos_seen"] == 40
    assert metrics["tool_demo_rate"] == 0.5
    assert metrics["last_loss"] < metrics["first_loss"]  # the mean of the last 10 steps
    # The training set as evaluation data: its loss after the last step.
    assert metrics["eval_loss"] < 0.5 * metrics["first_loss"]
    assert metrics["shared_prefix_tokens"] > 0
    assert metrics["trained_tokens"] < metrics["tokens"]
    assert metrics["device"] == "cpu"

    before, after = _weights(tiny), _weights(out)
    assert before.keys() == after.keys()  # the tied output layer stays out, as in the input
    assert all(after[k].dtype == before[k].dtype for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("model.language_model") for k in changed)
    assert not any(k.startswith("model.visual") for k in changed)  # frozen by default
    for path in tiny.iterdir():
        if not path.name.endswith(".safetensors"):
            assert (out / path.name).read_bytes() == path.read_bytes()
    assert json.loads((out / "sft.json").read_text())["metrics"]["steps"] == 10
    assert not (out / "checkpoints").exists()  # --save-every 0

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    state = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in after)
    AutoProcessor.from_pretrained(out)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tiny: Path, demos: Path, tmp_path: Path
) -> None:
    common = {"model": str(tiny), "data": str(demos), "steps": 4, "batch_size": 3, "lr": 3e-3}
    straight = sft_train.train(SftSettings(out=str(tmp_path / "a"), **common))

    class Crash(Exception):
        pass

    def crash_after_two(done: int, total: int, loss: float) -> None:
        if done == 2:
            raise Crash

    interrupted = SftSettings(out=str(tmp_path / "b"), save_every=2, **common)
    with pytest.raises(Crash):
        sft_train.train(interrupted, crash_after_two)
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["position"] == {"epoch": 1, "offset": 2}  # 6 of 4 demonstrations seen
    assert not (tmp_path / "b" / "config.json").exists()  # no export before the end

    # Without resume the checkpoints are not silently trained over.
    with pytest.raises(SftInputError, match="pass resume"):
        sft_train.train(interrupted)
    # A resume must be the same run.
    other = interrupted.model_copy(update={"resume": True, "batch_size": 2})
    with pytest.raises(SftInputError, match="batch_size: 3 then, 2 now"):
        sft_train.train(other)

    resumed = sft_train.train(interrupted.model_copy(update={"resume": True}))
    assert resumed["resumed_from_step"] == 2
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["first_loss"] == straight["first_loss"]
    assert resumed["last_loss"] == straight["last_loss"]
    assert resumed["demos_seen"] == straight["demos_seen"] == 12
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]


def test_shared_prefix_loss_equals_full_rows_and_mixed_prefixes_fall_back(
    tiny: Path, demos: Path, tmp_path: Path
) -> None:
    processor = AutoProcessor.from_pretrained(tiny)
    model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32)
    encoder = ImageEncoder(processor)
    maker = RowMaker(processor.tokenizer, encoder)
    rows = [maker.make(d) for d in load_demonstrations(demos)[:4]]
    kw: dict[str, Any] = {"pad_id": processor.tokenizer.pad_token_id, "image_token_id": 0}
    kw["image_token_id"] = encoder.image_token_id
    prefix = rows[0].prefix_ids
    shared = batch_loss(model, prefix, rows, **kw)
    full = batch_loss(model, prefix, rows, share_prefix=False, **kw)
    assert torch.allclose(shared, full, rtol=1e-4, atol=1e-5)

    # Two system prompts in one batch: the loss is the token-weighted mean of each prompt's.
    other = tmp_path / "other.jsonl"
    lines = demos.read_text().splitlines()
    other.write_text(lines[0].replace(DEFAULT_SYSTEM_PROMPT, "Be brief.") + "\n")
    (images := tmp_path / "images").mkdir()
    for path in (demos.parent / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    odd = maker.make(load_demonstrations(other)[0])
    assert odd.prefix_ids != prefix
    mixed = demo_loss(model, [*rows[:2], odd], **kw)
    part = demo_loss(model, rows[:2], **kw)
    alone = demo_loss(model, [odd], **kw)
    n_part = sum(r.trained_tokens for r in rows[:2])
    expected = (part * n_part + alone * odd.trained_tokens) / (n_part + odd.trained_tokens)
    assert torch.allclose(mixed, expected, rtol=1e-4, atol=1e-5)


def test_bad_input_is_a_usage_error_naming_the_problem(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}]}) + "\n")
    args = ["sft", "--model", str(tiny), "--data", str(bad), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: the conversation ends with a user message" in err
    assert main([*args[:-1], str(tiny)]) == 2
    assert "out must differ from model" in capsys.readouterr().err
    assert main([*args[:-1], f"{tiny}/."]) == 2
    assert "is the input model" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    good = tmp_path / "good.jsonl"
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "1"}]}
    good.write_text(json.dumps(record) + "\n")
    assert main(["sft", "--model", str(tiny), "--data", str(good), "--out", str(tmp_path / "mine")])
    assert "is not an axpo sft output" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
