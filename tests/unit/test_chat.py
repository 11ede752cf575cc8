"""The Qwen3-VL-Thinking tool format: exact rendering, forgiving parsing that never raises."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from axpo.contracts.chat import (
    IMAGE_PLACEHOLDER,
    ToolResponse,
    find_tool_call_blocks,
    parse_tool_call,
    parse_tool_calls,
    render_system_turn,
    render_tool_call,
    render_tool_responses,
    render_tools,
    split_thinking,
    tool_error_text,
)
from axpo.contracts.domain import ToolErrorKind

ZOOM_SCHEMA = {
    "type": "object",
    "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "label": {"type": "string"},
        "img_idx": {"type": "integer", "minimum": 0},
    },
    "required": ["bbox_2d", "label"],
}
SCHEMAS = {
    "image_zoom_in_tool": ZOOM_SCHEMA,
    "python": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
}

# --------------------------------------------------------------------------- rendering


def test_render_tools_matches_the_qwen_template_strings():
    tool = {
        "type": "function",
        "function": {"name": "f", "description": "Zoom é", "parameters": {"type": "object"}},
    }
    expected = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "f", "description": "Zoom é", '
        '"parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    assert render_tools([tool]) == expected
    assert render_system_turn("You are helpful.", [tool]) == (
        f"<|im_start|>system\nYou are helpful.\n\n{expected}<|im_end|>\n"
    )
    assert render_system_turn("Hi.", []) == "<|im_start|>system\nHi.<|im_end|>\n"


def test_render_tool_responses_merge_into_one_user_turn():
    text = render_tool_responses([ToolResponse("Zoomed.", image_count=1), ToolResponse("42")])
    assert text == (
        "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>Zoomed."
        "\n</tool_response>\n<tool_response>\n42\n</tool_response><|im_end|>\n"
    )


def test_render_tool_call_round_trips():
    raw = render_tool_call("image_zoom_in_tool", {"bbox_2d": [1, 2, 3, 4], "label": "cat"})
    assert raw.startswith("<tool_call>\n{")
    assert raw.endswith("}\n</tool_call>")
    (parsed,) = parse_tool_calls("</think>\n\n" + raw, SCHEMAS)
    assert parsed.ok
    assert json.loads(parsed.call.arguments_json)["label"] == "cat"


def test_error_text_names_the_kind():
    (p,) = parse_tool_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', SCHEMAS)
    assert tool_error_text(p.error).startswith("Error (unknown_tool): unknown tool 'nope'")


# --------------------------------------------------------------------------- parsing, tables

CALL = '{"name": "python", "arguments": {"code": "print(1)"}}'


@pytest.mark.parametrize(
    ("output", "names"),
    [
        (f"<tool_call>\n{CALL}\n</tool_call>", ["python"]),
        (f"<tool_call>{CALL}</tool_call>", ["python"]),  # no whitespace
        (f"  <tool_call>  \n\n {CALL} \n </tool_call> trailing words", ["python"]),
        (f"<tool_call>\n{CALL}", ["python"]),  # unclosed final call
        (f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>", ["python", "python"]),
        (f"Let me compute.\n<tool_call>\n{CALL}\n</tool_call>", ["python"]),  # text before
        (f"<think>maybe <tool_call>{CALL}</tool_call></think>\n\nNo tool.", []),  # in thinking
        (f"I will call it</think>\n\n<tool_call>{CALL}</tool_call>", ["python"]),  # no <think>
        (f"<think>unfinished <tool_call>{CALL}</tool_call>", []),
        (
            '<tool_call>\n{"name": "python", "arguments": {"code": "s = \'</tool_call>\'"}}'
            "\n</tool_call>",
            ["python"],
        ),  # closing tag inside a JSON string
        ("no calls here", []),
    ],
    ids=[
        "canonical",
        "no-space",
        "whitespace-trailing",
        "unclosed",
        "two-in-a-row",
        "text-before",
        "in-thinking",
        "missing-open-think",
        "unclosed-think",
        "tag-in-string",
        "none",
    ],
)
def test_finds_calls(output, names):
    parsed = parse_tool_calls(output, SCHEMAS)
    assert [p.call.name for p in parsed if p.call] == names
    assert all(p.ok for p in parsed)


def test_tag_inside_string_keeps_the_code():
    out = '<tool_call>{"name": "python", "arguments": {"code": "x=\'</tool_call>\'"}}</tool_call>'
    (p,) = parse_tool_calls(out)
    assert json.loads(p.call.arguments_json)["code"] == "x='</tool_call>'"


@pytest.mark.parametrize(
    ("block", "kind", "message"),
    [
        (
            '{"name": "python", "arguments": {"code": "1"}',
            ToolErrorKind.MALFORMED_CALL,
            "not valid JSON",
        ),  # missing brace
        ("", ToolErrorKind.MALFORMED_CALL, "empty"),
        ("[1, 2]", ToolErrorKind.MALFORMED_CALL, "must be a JSON object"),
        ('{"arguments": {}}', ToolErrorKind.MALFORMED_CALL, '"name"'),
        ('{"name": "python", "arguments": [1]}', ToolErrorKind.MALFORMED_CALL, "must be an object"),
        (
            '{"name": "python", "arguments": "{bad"}',
            ToolErrorKind.MALFORMED_CALL,
            '"arguments" string',
        ),
        ('{"name": "search", "arguments": {}}', ToolErrorKind.UNKNOWN_TOOL, "available:"),
        (
            '{"name": "image_zoom_in_tool", "arguments": {"label": "x"}}',
            ToolErrorKind.BAD_ARGUMENTS,
            "'bbox_2d' is a required property",
        ),
        (
            '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": "1,2,3,4", "label": "x"}}',
            ToolErrorKind.BAD_ARGUMENTS,
            "argument 'bbox_2d'",
        ),
        (
            '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3], "label": "x"}}',
            ToolErrorKind.BAD_ARGUMENTS,
            "too short",
        ),
        (
            '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1,2,3,4], "label": "x", '
            '"img_idx": -1}}',
            ToolErrorKind.BAD_ARGUMENTS,
            "argument 'img_idx'",
        ),
        ("{" * 50_000, ToolErrorKind.MALFORMED_CALL, "not valid JSON"),
        # Python literals JSON has no word for (written by the tiny model in the study: a set
        # where the arguments object belongs) are not valid JSON either.
        ("{'name': 'python', 'arguments': {'print(1)'}}", ToolErrorKind.MALFORMED_CALL, "JSON"),
        ("{'name': 'python', 'arguments': {'code': b'x'}}", ToolErrorKind.MALFORMED_CALL, "JSON"),
    ],
    ids=[
        "missing-brace",
        "empty",
        "array",
        "no-name",
        "args-array",
        "args-bad-string",
        "unknown-tool",
        "missing-arg",
        "mistyped-arg",
        "short-bbox",
        "negative-idx",
        "deep-nesting",
        "python-set-arguments",
        "python-bytes-argument",
    ],
)
def test_errors_are_structured(block, kind, message):
    parsed = parse_tool_call(block, SCHEMAS)
    assert parsed.error is not None
    assert parsed.error.kind is kind
    assert message in parsed.error.message


@pytest.mark.parametrize(
    "block",
    [
        '{"name": "python", "arguments": "{\\"code\\": \\"print(2)\\"}"}',  # serialized string
        "{'name': 'python', 'arguments': {'code': 'print(2)'}}",  # Python dict literal
        '{"name": "python", "parameters": {"code": "print(2)"}}',  # "parameters" alias
        '{"name": "python", "arguments": {"code": "print(2)"}} and then some words',
    ],
    ids=["args-as-string", "python-dict", "parameters-key", "trailing-text"],
)
def test_sloppy_but_clear_calls_are_accepted(block):
    parsed = parse_tool_call(block, SCHEMAS)
    assert parsed.ok, parsed.error
    assert json.loads(parsed.call.arguments_json) == {"code": "print(2)"}


def test_non_ascii_arguments_survive():
    (p,) = parse_tool_calls(
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 10, 10], '
        '"label": "猫 und Käse"}}</tool_call>',
        SCHEMAS,
    )
    assert p.ok
    assert json.loads(p.call.arguments_json)["label"] == "猫 und Käse"


def test_call_ids_count_from_the_start():
    parsed = parse_tool_calls(
        f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>", call_id_start=3
    )
    assert [p.call.call_id for p in parsed] == ["call_3", "call_4"]


# --------------------------------------------------------------------------- properties

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
arguments = st.dictionaries(st.text(max_size=10), json_value, max_size=4)
names = st.text(min_size=1, max_size=20)


@given(names, arguments, st.sampled_from(["", " ", "\n", "\n\n  "]), st.text(max_size=20))
def test_rendered_calls_parse_back(name, args, pad, prefix):
    prefix = prefix.replace("<", "")  # keep the prefix from opening tags of its own
    raw = render_tool_call(name, args).replace("\n", pad + "\n" + pad)
    # Known limit: the thinking split runs before the calls are parsed, so a thinking tag inside
    # a call's JSON strings ("<think>" as a name or argument, found by hypothesis) splits there.
    assume("<think>" not in raw and "</think>" not in raw)
    (parsed,) = parse_tool_calls("</think>" + prefix + raw)
    assert parsed.ok
    assert parsed.call.name == name
    assert json.loads(parsed.call.arguments_json) == args


@given(st.lists(st.tuples(names, arguments), min_size=1, max_size=4))
def test_several_calls_keep_their_order(calls):
    rendered = "\n".join(render_tool_call(n, a) for n, a in calls)
    assume("<think>" not in rendered and "</think>" not in rendered)  # the known limit above
    parsed = parse_tool_calls("</think>\n\n" + rendered)
    assert [(p.call.name, json.loads(p.call.arguments_json)) for p in parsed] == calls


@given(names, arguments)
def test_calls_inside_thinking_never_count(name, args):
    rendered = render_tool_call(name, args)
    assume("<think>" not in rendered and "</think>" not in rendered)  # the known limit above
    out = f"<think>{rendered}</think>\n\nplain answer"
    assert parse_tool_calls(out) == []


@given(
    st.text(
        alphabet=st.sampled_from(list('<>/{}[]":, \ntool_call_think nameargs')) | st.characters(),
        max_size=200,
    )
)
def test_arbitrary_text_never_raises(text):
    for parsed in parse_tool_calls(text, SCHEMAS):
        assert parsed.ok or parsed.error.message
    find_tool_call_blocks(text)
    split_thinking(text)


def test_image_placeholder_is_the_qwen_one():
    assert IMAGE_PLACEHOLDER == "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.mark.parametrize("written", ['"hello"', '"[oops"', '"{hello world}"', "[1]", "7", "null"])
def test_arguments_that_are_not_an_object_keep_the_call(written):
    # A call of a real tool with unusable arguments is a malformed call *of that tool*: the
    # rollout records it (the malformed-call diagnostic counts it) and the model reads why.
    parsed = parse_tool_call(f'{{"name": "python", "arguments": {written}}}', SCHEMAS, "call_3")
    assert parsed.error is not None
    assert parsed.error.kind is ToolErrorKind.MALFORMED_CALL
    assert parsed.error.message.startswith("python: ")
    assert '"arguments": {...}' in parsed.error.message
    assert parsed.call is not None
    assert (parsed.call.call_id, parsed.call.name) == ("call_3", "python")
    assert json.loads(parsed.call.arguments_json) == json.loads(written)


def test_arguments_as_a_json_string_of_an_object_still_work():
    parsed = parse_tool_call('{"name": "python", "arguments": "{\\"code\\": \\"1\\"}"}', SCHEMAS)
    assert parsed.ok
    assert json.loads(parsed.call.arguments_json) == {"code": "1"}


def test_a_call_between_text_is_found():
    out = 'Let me run it. <tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call> ok'
    (parsed,) = parse_tool_calls(out, SCHEMAS)
    assert parsed.ok
    assert parsed.call.name == "python"
