"""The SFT demonstration file: rendering byte-identical to the rollout (and to the earlier warm
start's demonstrations, token for token), the loss mask, and errors that name file, line and
problem. No model runs here; the tiny checkpoint only provides its tokenizer and processor."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from transformers import AutoProcessor

from axpo.contracts import chat
from axpo.contracts.domain import Image, ToolCall, ToolResult
from axpo.settings.job import DEFAULT_SYSTEM_PROMPT
from axpo.study.demo_file import DemoWriter
from axpo.study.tasks import choice_values, generate_task
from axpo.study.tiny_model import build_tiny_model
from axpo_learner import warmstart
from axpo_learner.batch import ImageEncoder
from axpo_learner.sft.format import (
    DemoFormatError,
    Span,
    iter_demonstrations,
    load_demonstrations,
    render,
)
from axpo_learner.sft.rows import RowMaker, tokenize_spans
from tests.integration.tool_specs import ZOOM_TOOL


def _png(colour: str = "red", size: int = 64) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _crop(call: ToolCall, images: Sequence[Image]) -> ToolResult:
    """A stand-in for the zoom tool: a fixed 32x32 crop (no tool server)."""
    assert call.name == "image_zoom_in_tool"
    return ToolResult(text="Zoomed in.", images=(Image.from_bytes(_png("blue", 32), "image/png"),))


def _legacy_spans(task: Any, use_tool: bool, letter: str, rng: random.Random) -> list[Span]:
    """The spans the earlier ``warmstart.build_demo`` produced (before the SFT stage), written
    out literally: the new format must reproduce them."""
    think_tool = "The box is too small to read. Let me zoom in.\n</think>\n\n"
    think_direct = "I can answer directly.\n</think>\n\n"
    spans = [
        Span(chat.render_system_turn(DEFAULT_SYSTEM_PROMPT, [ZOOM_TOOL]), False),
        Span(chat.render_user_turn(task.question, image_count=1) + chat.GENERATION_PROMPT, False),
    ]
    if not use_tool:
        spans.append(Span(f"{think_direct}<answer>{letter}</answer><|im_end|>", True))
        return spans
    arguments = {
        "bbox_2d": warmstart.padded_box(task.box_1000, rng),
        "label": "number box",
        "img_idx": 0,
    }
    result = _crop(ToolCall("call_0", "image_zoom_in_tool", json.dumps(arguments)), [task.image])
    response = chat.render_tool_responses(
        [chat.ToolResponse(text=result.text, image_count=len(result.images))]
    )
    spans.append(Span(think_tool + chat.render_tool_call("image_zoom_in_tool", arguments), True))
    spans.append(Span(chat.END_OF_TURN + response + chat.GENERATION_PROMPT, False))
    number = choice_values(task)[letter]
    tail = f"The number is {number}.\n</think>\n\n<answer>{letter}</answer><|im_end|>"
    spans.append(Span(tail, True))
    return spans


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny = build_tiny_model(tmp_path_factory.mktemp("sft-format") / "tiny", seed=0)
    return AutoProcessor.from_pretrained(tiny)


def _write(tmp_path: Path, records: Sequence[Any], name: str = "demos.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _image_file(tmp_path: Path, name: str = "a.png", colour: str = "red") -> str:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / name).write_bytes(_png(colour))
    return f"images/{name}"


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("use_tool", [True, False])
def test_warm_start_demo_in_the_new_format_tokenizes_like_the_old_one(
    tmp_path: Path, processor: Any, use_tool: bool
) -> None:
    task = generate_task("zoom_digits", 5, 128)
    letter = task.gold
    legacy = _legacy_spans(task, use_tool, letter, random.Random(0))
    with DemoWriter(tmp_path / "d.jsonl") as writer:
        record = warmstart.demo_record(
            task,
            tools=[ZOOM_TOOL],
            call_tool=_crop,
            system_prompt=DEFAULT_SYSTEM_PROMPT,
            use_tool=use_tool,
            letter=letter,
            rng=random.Random(0),
            writer=writer,
        )
        writer.write(record)
    (demo,) = load_demonstrations(tmp_path / "d.jsonl")
    assert list(demo.spans) == legacy
    tok = processor.tokenizer
    assert tokenize_spans(tok, demo.spans) == tokenize_spans(tok, legacy)
    # The images: the question's, then the tool's, as files written once by their hash.
    assert [p.read_bytes() for p in demo.images] == [task.image.data] + (
        [_png("blue", 32)] if use_tool else []
    )
    assert demo.tool_calls == int(use_tool)
    calls = chat.parse_tool_calls(demo.spans[2].text, {"image_zoom_in_tool": {"type": "object"}})
    assert [c.ok for c in calls] == ([True] if use_tool else [])


def test_prompt_tokens_equal_the_rollouts_single_encode(processor: Any, tmp_path: Path) -> None:
    """The rollout encodes ``render_prompt`` as one string; span by span gives the same ids."""
    image = _image_file(tmp_path)
    record = {
        "tools": [ZOOM_TOOL],
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q?"}],
            },
            {"role": "assistant", "reasoning_content": "r", "content": "<answer>A</answer>"},
        ],
    }
    demo = render(record, base=tmp_path, where="x:1")
    tok = processor.tokenizer
    ids, mask = tokenize_spans(tok, demo.spans[:2])
    whole = tok(chat.render_prompt("sys", [ZOOM_TOOL], "Q?", 1), add_special_tokens=False)
    assert ids == whole["input_ids"]
    assert not any(mask)


def test_two_calls_render_like_the_template_and_tool_messages_merge(tmp_path: Path) -> None:
    second = _image_file(tmp_path, "t.png", "green")
    calls = [
        {"type": "function", "function": {"name": "zoom", "arguments": {"x": 1}}},
        # OpenAI style: arguments as a JSON string.
        {"type": "function", "function": {"name": "search", "arguments": '{"q": "a"}'}},
    ]
    record = {
        "id": 7,
        "messages": [
            {"role": "user", "content": "How many?"},
            {
                "role": "assistant",
                "reasoning_content": "Look.",
                "content": "Checking.",
                "tool_calls": calls,
            },
            {
                "role": "tool",
                "content": [{"type": "image", "image": second}, {"type": "text", "text": "crop"}],
            },
            {"role": "tool", "content": "found"},
            {"role": "assistant", "reasoning_content": "Two.", "content": "<answer>2</answer>"},
        ],
    }
    demo = render(record, base=tmp_path, where="x:1")
    assert demo.id == "7"
    assert demo.tool_calls == 2
    assert [s.train for s in demo.spans] == [False, False, True, False, True]
    assert demo.spans[0].text == "<|im_start|>system\n<|im_end|>\n"  # no system, no tools
    assert demo.spans[1].text == chat.render_user_turn("How many?") + chat.GENERATION_PROMPT
    assert demo.spans[2].text == (
        "Look.\n</think>\n\nChecking.\n"
        '<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>'
    )
    assert demo.spans[3].text == (
        "<|im_end|>\n<|im_start|>user\n"
        "<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>crop\n</tool_response>\n"
        "<tool_response>\nfound\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert demo.spans[4].text == "Two.\n</think>\n\n<answer>2</answer><|im_end|>"
    assert demo.images == (tmp_path / second,)


def test_rows_train_only_assistant_tokens_never_image_tokens(
    tmp_path: Path, processor: Any
) -> None:
    task = generate_task("zoom_digits", 3, 128)
    with DemoWriter(tmp_path / "d.jsonl") as writer:
        writer.write(
            warmstart.demo_record(
                task,
                tools=[ZOOM_TOOL],
                call_tool=_crop,
                system_prompt="sys",
                use_tool=True,
                letter="B",
                rng=random.Random(1),
                writer=writer,
            )
        )
    (demo,) = load_demonstrations(tmp_path / "d.jsonl")
    encoder = ImageEncoder(processor)
    row = RowMaker(processor.tokenizer, encoder).make(demo)
    tok = processor.tokenizer
    trained = tok.decode([t for t, m in zip(row.token_ids, row.loss_mask, strict=True) if m])
    assert trained == "".join(s.text for s in demo.spans if s.train)
    assert trained.endswith("<|im_end|>")
    image_positions = [i for i, t in enumerate(row.token_ids) if t == encoder.image_token_id]
    expected = sum(encoder.tokens(g) for g in row.image_grid_thw)
    assert len(image_positions) == expected > 2  # expanded: more than one per image
    assert not any(row.loss_mask[i] for i in image_positions)
    assert row.prefix_ids == tuple(tok(demo.spans[0].text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- errors


def _user(image: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Q"}]
    if image:
        parts.insert(0, {"type": "image", "image": image})
    return {"role": "user", "content": parts}


_CALL = [{"type": "function", "function": {"name": "zoom", "arguments": {}}}]
_ANSWER = {"role": "assistant", "reasoning_content": "r", "content": "<answer>1</answer>"}
_CALLING = {"role": "assistant", "reasoning_content": "r", "content": "", "tool_calls": _CALL}
_TOOL = {"role": "tool", "content": "done"}

BAD: list[tuple[str, Any, str]] = [
    (
        "unknown role",
        {"messages": [_user(), {"role": "bot", "content": "x"}]},
        "unknown role 'bot'",
    ),
    (
        "missing image",
        {"messages": [_user("images/nope.png"), _ANSWER]},
        "'images/nope.png' not found",
    ),
    (
        "tool without call",
        {"messages": [_user(), _TOOL, _ANSWER]},
        "tool message without a preceding assistant tool call",
    ),
    (
        "answer not last",
        {"messages": [_user(), _ANSWER, _ANSWER]},
        "message 1: an assistant turn without tool calls must be the last",
    ),
    ("no answer", {"messages": [_user(), _CALLING, _TOOL]}, "ends with a tool message"),
    (
        "empty answer",
        {"messages": [_user(), {"role": "assistant", "content": ""}]},
        "has no content (the answer)",
    ),
    (
        "no user",
        {"messages": [{"role": "system", "content": "s"}, _ANSWER]},
        "expected the user message",
    ),
    (
        "second user",
        {"messages": [_user(), _CALLING, _TOOL, _user(), _ANSWER]},
        "a user message after the first",
    ),
    (
        "unanswered call",
        {"messages": [_user(), _CALLING, _ANSWER]},
        "1 tool call(s) answered by 0 tool message(s)",
    ),
    (
        "bad arguments",
        {
            "messages": [
                _user(),
                {
                    **_CALLING,
                    "tool_calls": [
                        {"type": "function", "function": {"name": "z", "arguments": "{nope"}}
                    ],
                },
                _TOOL,
                _ANSWER,
            ]
        },
        "z arguments string is not JSON",
    ),
    (
        "thinking in content",
        {"messages": [_user(), {"role": "assistant", "content": "<think>a</think>1"}]},
        "put the thinking in reasoning_content",
    ),
    (
        "image after text",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Q"},
                        {"type": "image", "image": "images/a.png"},
                    ],
                },
                _ANSWER,
            ]
        },
        "image after the text",
    ),
    (
        "video part",
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}, _ANSWER]},
        "unknown part type 'video'",
    ),
    ("no messages", {"id": "x"}, '"messages" must be a non-empty list'),
    ("not an object", [1, 2], "expected a JSON object, got list"),
    ("bad tools", {"tools": [{"name": "zoom"}], "messages": [_user(), _ANSWER]}, "tools[0]"),
]


@pytest.mark.parametrize(("record", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_lines_name_file_line_and_problem(
    tmp_path: Path, record: Any, message: str
) -> None:
    _image_file(tmp_path)
    good = {"messages": [_user("images/a.png"), _ANSWER]}
    path = _write(tmp_path, [good, record])
    with pytest.raises(DemoFormatError) as info:
        load_demonstrations(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert message in str(info.value)


def test_invalid_json_and_missing_or_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [}\n')
    with pytest.raises(DemoFormatError, match=r"d\.jsonl:1: not valid JSON"):
        load_demonstrations(path)
    path.write_text("\n\n")
    with pytest.raises(DemoFormatError, match="no demonstrations"):
        load_demonstrations(path)
    with pytest.raises(DemoFormatError, match="no such demonstration file"):
        load_demonstrations(tmp_path / "absent.jsonl")


def test_blank_lines_are_skipped_and_absolute_image_paths_work(tmp_path: Path) -> None:
    image = tmp_path / "elsewhere.png"
    image.write_bytes(_png())
    record = {"messages": [_user(str(image)), _ANSWER]}
    path = tmp_path / "sub" / "d.jsonl"
    path.parent.mkdir()
    path.write_text("\n" + json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    demos = list(iter_demonstrations(path))
    assert [d.where for d in demos] == [f"{path}:2", f"{path}:4"]
    assert demos[0].images == (image,)
    assert demos[0].id == f"{path}:2"  # no id: where it is


def test_a_placeholder_written_in_the_text_is_caught_before_training(
    tmp_path: Path, processor: Any
) -> None:
    record = {"messages": [_user(), _ANSWER]}
    record["messages"][0]["content"][0]["text"] = f"Look: {chat.IMAGE_PLACEHOLDER}"
    demo = render(record, base=tmp_path, where="f.jsonl:9")
    maker = RowMaker(processor.tokenizer, ImageEncoder(processor))
    with pytest.raises(DemoFormatError, match=r"f\.jsonl:9: 1 image placeholders .* for 0 images"):
        maker.check(demo)
    trained = {"messages": [_user(), {**_ANSWER, "content": chat.IMAGE_PLACEHOLDER}]}
    with pytest.raises(DemoFormatError, match="placeholder is inside a trained span"):
        maker.check(render(trained, base=tmp_path, where="f.jsonl:10"))
    maker.check(render({"messages": [_user(), _ANSWER]}, base=tmp_path, where="f.jsonl:11"))
