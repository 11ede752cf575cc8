"""The tiny Qwen3-VL checkpoint: it loads by the code path of a real checkpoint, generates with
images, and its chat template renders exactly what axpo.contracts.chat renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from axpo.cli.main import main
from axpo.contracts.chat import (
    GENERATION_PROMPT,
    IMAGE_PLACEHOLDER,
    ToolResponse,
    render_system_turn,
    render_tool_call,
    render_tool_responses,
)
from axpo.study.tiny_model import SPECIAL_TOKENS, TAG_TOKENS, build_tiny_model, count_parameters
from tests.integration.tool_specs import ZOOM_TOOL

pytestmark = pytest.mark.integration

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code; stdout is returned. Non-ASCII: é.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}},
    },
}
ZOOM_ARGS = {"bbox_2d": [100, 200, 400, 500], "label": "framed cell", "img_idx": 0}
PY_ARGS = {"code": "print(6 * 7)"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def _image(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (width, height), color)
    for x in range(0, width, 8):  # some structure, so the vision tower sees more than a constant
        img.putpixel((x, x % height), (255 - color[0], x % 256, color[2]))
    return img


def _tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _conversation(first: Any = None, second: Any = None) -> list[dict[str, Any]]:
    """System + tools, a user question with an image, a thinking assistant turn with two tool
    calls, two tool responses (the first with an image), and a final thinking answer."""
    first_item = {"type": "image", "image": first} if first is not None else {"type": "image"}
    second_item = {"type": "image", "image": second} if second is not None else {"type": "image"}
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [first_item, {"type": "text", "text": "What colour is the framed cell?"}],
        },
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "The frame is small.\nLet me zoom in.",
            "tool_calls": [
                _tool_call("image_zoom_in_tool", ZOOM_ARGS),
                _tool_call("python", PY_ARGS),
            ],
        },
        {"role": "tool", "content": [second_item, {"type": "text", "text": "Zoomed in."}]},
        {"role": "tool", "content": "42"},
        {
            "role": "assistant",
            "content": "The answer is 3.",
            "reasoning_content": "The crop shows green, which is 3.",
        },
    ]


def _expected_prefix() -> str:
    """What axpo.contracts.chat renders for the conversation up to the tool responses."""
    return (
        render_system_turn("You are a helpful assistant.", [ZOOM_TOOL, PYTHON_TOOL])
        + f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What colour is the framed cell?<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\nThe frame is small.\nLet me zoom in.\n</think>\n\n"
        + render_tool_call("image_zoom_in_tool", ZOOM_ARGS)
        + "\n"
        + render_tool_call("python", PY_ARGS)
        + "<|im_end|>\n"
        + render_tool_responses([ToolResponse("Zoomed in.", image_count=1), ToolResponse("42")])
    )


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_has_what_a_real_one_has(model_dir: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
    ):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    rope = text["rope_parameters"]
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert rope["mrope_interleaved"] is True  # vLLM interleaves M-RoPE only when set
    assert sum(rope["mrope_section"]) == text["head_dim"] // 2
    assert config["tie_word_embeddings"] is False
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.convert_tokens_to_ids
    assert config["image_token_id"] == ids("<|image_pad|>")
    assert config["video_token_id"] == ids("<|video_pad|>")
    assert config["vision_start_token_id"] == ids("<|vision_start|>")
    assert config["vision_end_token_id"] == ids("<|vision_end|>")
    assert len(tokenizer) <= text["vocab_size"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids("<|im_end|>"), ids("<|endoftext|>")]


def test_loads_as_qwen3_vl_with_its_processor(processor: Any, model: Any, model_dir: Path) -> None:
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.dtype == torch.float32
    assert count_parameters(model_dir) == sum(p.numel() for p in model.parameters())
    assert 3_000_000 < count_parameters(model_dir) < 5_000_000


def test_special_tokens_are_single_ids_and_tags_survive_skipping(processor: Any) -> None:
    tokenizer = processor.tokenizer
    for token in (*SPECIAL_TOKENS, *TAG_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [
            tokenizer.convert_tokens_to_ids(token)
        ], token
    assert sorted(tokenizer.all_special_tokens) == sorted(SPECIAL_TOKENS)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    text = (
        "<|im_start|>assistant\n<think>\nzoom\n</think>\n\n<tool_call>\n{}\n</tool_call>"
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
        f"{IMAGE_PLACEHOLDER}ok\n</tool_response><|im_end|>"
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "assistant\n<think>\nzoom\n</think>\n\n<tool_call>\n{}\n</tool_call>\n"
        "user\n<tool_response>\nok\n</tool_response>"
    )


# --------------------------------------------------------------------------- chat template


def test_chat_template_renders_axpo_chat_strings(processor: Any) -> None:
    messages = _conversation()
    tools = [ZOOM_TOOL, PYTHON_TOOL]
    prompt = processor.apply_chat_template(
        messages[:5], tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert prompt == _expected_prefix() + GENERATION_PROMPT

    whole = processor.apply_chat_template(messages, tools=tools, tokenize=False)
    final = "<|im_start|>assistant\n<think>\nThe crop shows green, which is 3.\n</think>\n\n"
    assert whole == _expected_prefix() + final + "The answer is 3.<|im_end|>\n"


def test_chat_template_reads_reasoning_from_content_too(processor: Any) -> None:
    with_field = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "R"},
    ]
    in_content = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"},
    ]
    expected = (
        "<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
    )
    assert processor.apply_chat_template(with_field, tokenize=False) == expected
    assert processor.apply_chat_template(in_content, tokenize=False) == expected


def test_chat_template_drops_reasoning_before_the_last_user_query(processor: Any) -> None:
    messages = [
        {"role": "user", "content": "Q1"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "R0",
            "tool_calls": [_tool_call("python", PY_ARGS)],
        },
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nQ1<|im_end|>\n"
        f"<|im_start|>assistant\n{render_tool_call('python', PY_ARGS)}<|im_end|>\n"
        + render_tool_responses([ToolResponse("42")])
        + "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n"
    )


def test_system_turn_without_tools(processor: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        render_system_turn("Be brief.", []) + "<|im_start|>user\nHi<|im_end|>\n" + GENERATION_PROMPT
    )


# --------------------------------------------------------------------------- generation


def _inputs(processor: Any, messages: list[dict[str, Any]]) -> Any:
    return processor.apply_chat_template(
        messages,
        tools=[ZOOM_TOOL],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
    )


def _image_pads(processor: Any, inputs: Any) -> int:
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return int((inputs["input_ids"] == image_pad).sum())


def test_forward_and_greedy_generate_with_one_image(processor: Any, model: Any) -> None:
    overview = _image(64, 96, (200, 30, 30))
    inputs = _inputs(processor, _conversation(overview)[:2])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 4]]  # 16 px patches
    assert _image_pads(processor, inputs) == 6  # (96/32)·(64/32) after the 2×2 merge
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(out, again)


def test_generate_with_a_second_image_in_a_tool_response(processor: Any, model: Any) -> None:
    overview = _image(64, 64, (30, 200, 30))
    crop = _image(128, 64, (30, 30, 200))
    inputs = _inputs(processor, _conversation(overview, crop)[:5])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert _image_pads(processor, inputs) == 4 + 8
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8
    # The second image changes what the model sees: the first-image-only prompt differs.
    one = _inputs(processor, _conversation(overview, overview)[:5])
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**one).logits[0, -1]
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- builds


def test_same_seed_same_files_other_seed_other_weights(model_dir: Path, tmp_path: Path) -> None:
    assert main(["model", "tiny", "--out", str(tmp_path / "again"), "--seed", "0"]) == 0
    for path in sorted(model_dir.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    weights = "model.safetensors"
    assert (other / weights).read_bytes() != (model_dir / weights).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_tied_build_shares_the_embedding(model_dir: Path, tmp_path: Path) -> None:
    tied = build_tiny_model(tmp_path / "tied", seed=0, tie_word_embeddings=True)
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
    header = _safetensors_names(tied / "model.safetensors")
    assert not any("lm_head" in name for name in header)  # the output layer is the embedding
    assert "lm_head.weight" in _safetensors_names(model_dir / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(tied)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    assert count_parameters(tied) == count_parameters(model_dir) - embed.numel()


def _safetensors_names(path: Path) -> list[str]:
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(size)) if k != "__metadata__"]
