"""The learner's image path on the tiny Qwen3-VL model: placeholder expansion, logprobs, a step.

Trajectories hold one unexpanded ``<|image_pad|>`` per image (as the rollout sends them to
vLLM); the learner must see exactly what the processor makes of the same conversation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage

from axpo.contracts.chat import ToolResponse, render_tool_call, render_tool_responses
from axpo.contracts.domain import Group, Image, Reward, Trajectory
from axpo.settings.job import AlgorithmSpec
from axpo.settings.learner import LearnerSettings
from axpo.study.tiny_model import build_tiny_model
from axpo_learner.batch import ImageEncoder, collate, rows_from_groups
from axpo_learner.logprobs import token_logprobs
from axpo_learner.trainer import Trainer, load_policy

ARGS = {"bbox_2d": [100, 200, 600, 700], "label": "the red block", "img_idx": 0}
REASONING = ("I need to look at the red block more closely.", "So the answer is 3.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def policy(tiny):
    model, processor = load_policy(tiny)
    model.eval()
    return model, processor


def png(width: int, height: int, seed: int) -> Image:
    """A small PNG with a gradient, so patches differ."""
    img = PILImage.new("RGB", (width, height))
    img.putdata(
        [
            ((x * 7 + seed * 50) % 256, (y * 5) % 256, (x + y + 40 * seed) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


IMAGES = (png(100, 70, 1), png(160, 64, 2))  # grids (1, 4, 6) and (1, 4, 10): 6 and 10 tokens


def decoded(images) -> list[PILImage.Image]:
    return [PILImage.open(io.BytesIO(im.data)).convert("RGB") for im in images]


def conversation(n_images: int) -> tuple[list[dict], list[tuple[str, bool]]]:
    """Messages for the chat template, and the same conversation as the rollout builds it:
    (text, written by the model) pieces, token-in/token-out."""
    question = {"type": "text", "text": "What color is the block in the center?"}
    messages: list[dict] = [{"role": "user", "content": [{"type": "image"}, question]}]
    call = {"name": "image_zoom_in_tool", "arguments": json.dumps(ARGS)}
    messages.append(
        {
            "role": "assistant",
            "reasoning_content": REASONING[0],
            "content": "",
            "tool_calls": [call],
        }
    )
    gen1 = f"{REASONING[0]}\n</think>\n\n{render_tool_call('image_zoom_in_tool', ARGS)}<|im_end|>"
    pieces: list[tuple[str, bool]] = [("", False), (gen1, True)]
    if n_images == 2:
        zoom = [{"type": "image"}, {"type": "text", "text": "Zoomed in on the center."}]
        messages.append({"role": "tool", "content": zoom})
        messages.append({"role": "assistant", "reasoning_content": REASONING[1], "content": "3"})
        delta = "\n" + render_tool_responses([ToolResponse("Zoomed in on the center.", 1)])
        pieces += [(delta + "<|im_start|>assistant\n<think>\n", False)]
        pieces += [(f"{REASONING[1]}\n</think>\n\n3<|im_end|>", True)]
    return messages, pieces


def trajectory(processor, n_images: int, tid: str = "t", reward: float = 1.0) -> Trajectory:
    messages, pieces = conversation(n_images)
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    pieces[0] = (prompt, False)
    tok = processor.tokenizer
    ids: list[int] = []
    mask: list[bool] = []
    logprobs: list[float] = []
    for text, written in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [written] * len(piece)
        # Distinct values, so a shifted or dropped one shows.
        logprobs += [-0.01 * (len(logprobs) + i + 1) if written else 0.0 for i in range(len(piece))]
    return Trajectory(
        trajectory_id=tid,
        token_ids=tuple(ids),
        loss_mask=tuple(mask),
        logprobs=tuple(logprobs),
        entropies=(0.0,) * len(ids),
        segments=(),
        prompt_length=len(tok(prompt, add_special_tokens=False)["input_ids"]),
        image_sha256=tuple(im.sha256 for im in IMAGES[:n_images]),
        reward=Reward(reward, reward > 0, reward, 0, 0, None, "", ""),
    )


def processor_inputs(processor, n_images: int) -> dict[str, torch.Tensor]:
    """What apply_chat_template + the processor make of the whole conversation."""
    messages, _ = conversation(n_images)
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_end|>\n")
    return processor(
        text=[text.removesuffix("\n")], images=decoded(IMAGES[:n_images]), return_tensors="pt"
    )


@pytest.mark.parametrize("n_images", [1, 2])
def test_expansion_matches_the_processor(policy, n_images):
    _, processor = policy
    t = trajectory(processor, n_images)
    want = processor_inputs(processor, n_images)
    # The rollout's pieces tokenize as the whole text does (no merge across boundaries).
    unexpanded = processor.tokenizer(
        processor.tokenizer.decode(t.token_ids), add_special_tokens=False
    )["input_ids"]
    assert tuple(unexpanded) == t.token_ids

    enc = ImageEncoder(processor)
    group = Group("g", "q", (t,), images=IMAGES[:n_images])
    (row,) = rows_from_groups([group], AlgorithmSpec(), images=enc)
    assert list(row.token_ids) == want["input_ids"][0].tolist()
    assert row.image_grid_thw is not None
    assert row.pixel_values is not None
    assert torch.equal(row.image_grid_thw, want["image_grid_thw"])
    assert torch.equal(row.pixel_values, want["pixel_values"])
    pads = [i for i, tok in enumerate(row.token_ids) if tok == enc.image_token_id]
    assert len(pads) == sum(int(g.prod()) // 4 for g in want["image_grid_thw"])
    assert len(row.token_ids) == len(t.token_ids) + len(pads) - n_images

    # Model-written tokens keep their ids, mask and logprobs, in order, at shifted positions.
    written = [i for i, m in enumerate(row.loss_mask) if m]
    assert [row.token_ids[i] for i in written] == [
        tok for tok, m in zip(t.token_ids, t.loss_mask, strict=True) if m
    ]
    assert [row.rollout_logprobs[i] for i in written] == [
        lp for lp, m in zip(t.logprobs, t.loss_mask, strict=True) if m
    ]
    assert sum(row.loss_mask) == sum(t.loss_mask)
    assert all(not row.loss_mask[i] and row.rollout_logprobs[i] == 0.0 for i in pads)
    # The tail after the last image is the trajectory's tail, unshifted relative to the end.
    tail = t.token_ids[::-1].index(enc.image_token_id)
    assert row.token_ids[-tail:] == t.token_ids[-tail:]
    assert row.loss_mask[-tail:] == t.loss_mask[-tail:]


def test_learner_logprobs_equal_transformers_on_the_expanded_input(policy):
    model, processor = policy
    enc = ImageEncoder(processor)
    trajs = (trajectory(processor, 2, "two"), trajectory(processor, 1, "one", reward=0.0))
    rows = rows_from_groups([Group("g", "q", trajs, images=IMAGES)], AlgorithmSpec(), images=enc)
    # Both rows in one right-padded micro-batch: image order across rows, per-row M-RoPE.
    mb = collate(rows, pad_id=processor.tokenizer.pad_token_id, image_token_id=enc.image_token_id)
    assert mb.image_grid_thw is not None
    assert len(mb.image_grid_thw) == 3
    with torch.no_grad():
        logp, _ = token_logprobs(model, mb)
        for i, n_images in enumerate((2, 1)):
            inputs = processor_inputs(processor, n_images)
            logits = model(**inputs, use_cache=False).logits[0, :-1].float()
            ids = inputs["input_ids"][0, 1:]
            want = torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]
            got = logp[i, : len(ids)]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # The sampled tokens specifically (shifted: token t is scored at t-1).
            sampled = mb.loss_mask[i, 1 : len(ids) + 1]
            assert int(sampled.sum()) == sum(trajs[i].loss_mask[1:])
            torch.testing.assert_close(got[sampled], want[sampled], rtol=1e-5, atol=1e-5)
            # A text-only forward of the same ids would differ: the pixels matter.
            text_only = model(input_ids=inputs["input_ids"], use_cache=False).logits[0, :-1]
            assert not torch.allclose(text_only.float(), logits, atol=1e-4)


def test_train_step_with_images_updates_the_policy(tiny):
    def step(budget: int) -> tuple[Trainer, dict[str, float], dict[str, torch.Tensor]]:
        t = Trainer(LearnerSettings(model=str(tiny), lr=1e-3, seed=1, micro_batch_tokens=budget))
        trajs = tuple(
            trajectory(t.processor, 1 + i % 2, f"t{i}", reward=float(i // 2)) for i in range(4)
        )
        before = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        return t, t.train_step([Group("g", "q", trajs, images=IMAGES)]), before

    a, m, before = step(200)
    assert m["images"] == 6
    assert m["micro_batches"] > 1
    assert m["sequences"] == 4
    # Rollout logprobs here are made up (-0.01 * position): the mismatch is large but finite.
    assert 0 < m["logprob_mismatch_mean"] < 100
    after = a.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("visual" in k for k in changed), "no gradient reached the vision tower"
    assert any("language_model" in k for k in changed)
    # Each micro-batch carries its own rows' images: splitting does not change the update.
    _, whole, _ = step(100_000)
    assert whole["micro_batches"] == 1
    assert whole["loss"] == pytest.approx(m["loss"], rel=1e-5, abs=1e-7)
    assert whole["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-5)


def test_images_without_bytes_or_processor_are_refused(policy):
    _, processor = policy
    t = trajectory(processor, 2)
    enc = ImageEncoder(processor)
    with pytest.raises(ValueError, match="has no bytes in the group"):
        rows_from_groups([Group("g", "q", (t,), images=IMAGES[:1])], AlgorithmSpec(), images=enc)
    with pytest.raises(ValueError, match="no image processor"):
        rows_from_groups([Group("g", "q", (t,), images=IMAGES)], AlgorithmSpec())
    bad = Image(IMAGES[1].sha256, IMAGES[0].data, "image/png")
    with pytest.raises(ValueError, match="do not match the hash"):
        rows_from_groups(
            [Group("g", "q", (t,), images=(IMAGES[0], bad))], AlgorithmSpec(), images=enc
        )
    one_sha = Trajectory(**{**t.__dict__, "image_sha256": t.image_sha256[:1]})
    with pytest.raises(ValueError, match="2 image placeholders in token_ids for 1 images"):
        rows_from_groups([Group("g", "q", (one_sha,), images=IMAGES)], AlgorithmSpec(), images=enc)
