"""The tiny model's tokenizer and chat template, built offline (:mod:`axpo.study.tiny_model`).

- Tokenizer: byte-level BPE trained here by the ``tokenizers`` library on a small built-in
  text, with Qwen's pre-tokenizer, special tokens and tag tokens (the tags are *not* special,
  as in Qwen: they survive ``skip_special_tokens``). Its ids differ from Qwen's: look them up
  by token string.
- Chat template: written from docs/qwen-format.md; renders exactly what
  :mod:`axpo.contracts.chat` renders.

``tokenizers`` is imported inside :func:`build_tokenizer`, so importing this module costs nothing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

from axpo.contracts.chat import render_tool_call, render_tools

DEFAULT_VOCAB_SIZE = 1024

# Qwen's special tokens, in Qwen's order. ``<|im_end|>`` ends a turn (eos), ``<|endoftext|>`` pads.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added but not special, as in Qwen's tokenizer: decoding with skip_special_tokens keeps them.
TAG_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2/Qwen3's pre-tokenizer split (digits one by one, letters in runs, punctuation runs).
# transformers' Qwen2Tokenizer rebuilds its pipeline with this regex from the vocab and merges,
# so the tokenizer.json written here must use exactly the same one.
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# The Qwen3-VL-Thinking conversation format (docs/qwen-format.md), written for this model.
# It must render byte for byte what axpo.contracts.chat renders;
# tests/integration/test_tiny_model.py checks that.
CHAT_TEMPLATE = r"""{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if item.type in ('image', 'image_url') or 'image' in item or 'image_url' in item %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif item.type == 'video' or 'video' in item %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is not none %}
        {{- content }}
    {%- endif %}
{%- endmacro %}
{%- set has_system = messages and messages[0].role == 'system' %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if has_system %}
        {%- set system_text = render_content(messages[0].content) %}
        {%- if system_text %}
            {{- system_text + '\n\n' }}
        {%- endif %}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and ' }}
    {{- 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{#- The last real user query: a user turn that is not only tool responses. Reasoning of
    assistant turns before it is dropped. #}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages | length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages | length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set text = render_content(message.content) | trim %}
        {%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role in ('user', 'system') %}
        {{- '<|im_start|>' + message.role + '\n' + render_content(message.content) }}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = render_content(message.content) %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif message.reasoning is string %}
            {%- set reasoning = message.reasoning %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {%- set reasoning = reasoning.strip('\n') %}
        {%- set content = content.lstrip('\n') %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<think>\n' + reasoning + '\n</think>\n\n' }}
        {%- endif %}
        {{- content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}
                {{- call.arguments }}
            {%- else %}
                {{- call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + render_content(message.content) + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}
"""

# --------------------------------------------------------------------------- tokenizer text

_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "pink")
_THINGS = (
    "block", "cell", "frame", "grid", "square", "region", "corner", "sign", "digit", "number",
    "label", "object", "box", "line", "text", "chart", "table", "row", "column", "image",
)  # fmt: skip
_VERBS = (
    "is", "shows", "has", "looks", "contains", "marks", "reads", "holds", "covers", "touches",
)  # fmt: skip
_PLACES = (
    "top left", "top right", "bottom left", "bottom right", "center", "middle", "left side",
    "right side", "upper half", "lower half",
)  # fmt: skip
_SENTENCES = (
    "The {c} {t} {v} in the {p} of the image.",
    "Let me zoom in on the {t} in the {p} to see it better.",
    "I need to look at the {c} {t} more closely.",
    "The {t} with the {c} frame is in row {d} and column {e}.",
    "After zooming in, the {t} {v} {c}, so the answer is {d}.",
    "Wait, the {t} is too small to read. I will crop the {p}.",
    "So the answer is {d}.",
    "There are {d} {c} {t}s and {e} {t}s in total.",
    "Hmm, the first crop was wrong; let me check the {p} again.",
    "What color is the {t} in the {p}? Answer with one digit.",
    "You are a helpful assistant. Think step by step, then answer.",
    "The user asks about the {c} {t}. The system gave me tools to use.",
)
# Everyday words for free-form lines, so BPE has enough material to fill a ~1k vocabulary.
_WORD_TEXT = """
about above across after again against all almost along also always among and another answer
any are around ask at away back be because been before begin behind being below best better
between big both bright but by can carefully change check choose clear close color come could
count crop dark detail did different do does done down draw each edge either end enough even
every exactly example far few find first follow for found from front full get give go good great
half hand have he her here high him his how however if important in inside into it its just keep
kind know large last left less let light like little look lower made make many may maybe me might
more most much must my near need never new next no not nothing now number of off often on once one
only open or other our out outside over own part pattern people picture place point position
question quite rather read really result right same say second see seem shape should show side
since size small so some something sure take than that the their them then there these they thing
think this those through to together too top toward try turn two under until up upper us use very
want was way we well were what when where which while white who why will with within without word
would yes yet you your zero one two three four five six seven eight nine ten hundred thousand
"""
_WORDS = tuple(_WORD_TEXT.split())
_PYTHON = (
    "print(sum(range({d}{e})))",
    "def area(w, h):\n    return w * h\n",
    "import math\nx = math.sqrt({d}{e})\nprint(round(x, 2))",
    "values = [{d}, {e}, {d}{e}]\nprint(max(values) - min(values))",
)


def _zoom_tool_spec() -> dict[str, Any]:
    """An ``image_zoom_in_tool`` spec, only as text for the tokenizer to see."""
    return {
        "type": "function",
        "function": {
            "name": "image_zoom_in_tool",
            "description": "Zoom in on an image region given by a bounding box and a label.",
            "parameters": {
                "type": "object",
                "properties": {
                    "bbox_2d": {
                        "type": "array",
                        "items": {"type": "number"},
                        "description": "[x1, y1, x2, y2] in relative coordinates 0-1000",
                    },
                    "label": {"type": "string", "description": "what is in the box"},
                    "img_idx": {"type": "integer", "description": "which image, from 0"},
                },
                "required": ["bbox_2d", "label"],
            },
        },
    }


def tokenizer_corpus() -> Iterator[str]:
    """The built-in text the tokenizer is trained on: English-ish sentences, digits, JSON
    and the tool format. Fixed (its own RNG), so every build gets the same tokenizer."""
    rng = random.Random(20250101)
    yield render_tools([_zoom_tool_spec()])
    for _ in range(3000):
        slots = {
            "c": rng.choice(_COLORS),
            "t": rng.choice(_THINGS),
            "v": rng.choice(_VERBS),
            "p": rng.choice(_PLACES),
            "d": rng.randrange(10),
            "e": rng.randrange(10),
        }
        role = rng.choice(("system", "user", "assistant"))  # what follows <|im_start|>
        yield f"{role}\n" + rng.choice(_SENTENCES).format(**slots)
        if rng.random() < 0.3:
            box = sorted(rng.randrange(1001) for _ in range(4))
            call = render_tool_call(
                "image_zoom_in_tool",
                {
                    "bbox_2d": [box[0], box[1], box[2], box[3]],
                    "label": f"the {slots['c']} {slots['t']}",
                    "img_idx": rng.randrange(3),
                },
            )
            yield f"{call}\nZoomed in on the {slots['p']}."
        if rng.random() < 0.1:
            yield rng.choice(_PYTHON).format(**slots)
            yield json.dumps({"name": "python", "arguments": {"code": "print(1 + 2)"}})
        if rng.random() < 0.05:
            yield "Error (bad_arguments): image_zoom_in_tool: argument 'bbox_2d' is too short"
        words = [rng.choice(_WORDS) for _ in range(rng.randrange(4, 16))]
        yield " ".join(words).capitalize() + rng.choice((".", "?", "!", ",", ":"))


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with Qwen's pipeline, at most ``vocab_size``
    tokens (special and tag tokens included, appended last as in Qwen's vocabulary)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, trainers
    from tokenizers import pre_tokenizers as pre

    added = len(SPECIAL_TOKENS) + len(TAG_TOKENS)
    if vocab_size < 256 + added:
        raise ValueError(f"vocab_size must be at least {256 + added} (bytes + added tokens)")
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - added,
        min_frequency=2,
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tokenizer
