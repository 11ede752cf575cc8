"""The start-up chat-template check (axpo.contracts.template_check) on the tiny checkpoint's real
tokenizer and template, and on copies of it whose template was edited the way real templates
differ: one that drops tool responses, one that writes tool calls as XML (newer Qwen), one
without the thinking generation prompt (an Instruct model), one that strips the thinking of
the tool-calling turn. A rollout worker refuses to start on such a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from axpo.contracts.template_check import (
    SAMPLE_SYSTEM,
    SAMPLE_TOOLS,
    TemplateMismatch,
    _render,
    _special_tokens,
    _stages,
    check_chat_template,
)
from axpo.rpc.client import ServiceUnavailableError
from axpo.settings.base import RpcClientSettings
from axpo.settings.job import DEFAULT_SYSTEM_PROMPT, load_job_spec
from axpo.settings.queue import QueueSettings
from axpo.settings.rollout import RolloutSettings
from axpo.study.tiny_model import build_tiny_model
from axpo.study.tiny_tokenizer import CHAT_TEMPLATE
from axpo_rollout import server

PIECES = ("prompt", "tool-call turn", "tool-response delta", "final answer turn")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _edited(old: str, new: str) -> str:
    assert old in CHAT_TEMPLATE, old  # the edit applies: the test cannot pass vacuously
    return CHAT_TEMPLATE.replace(old, new)


def with_template(model_dir: Path, out: Path, template: str, name: str = "chat_template.jinja"):
    """A checkpoint with the tiny model's tokenizer and the given chat template (no weights:
    the check reads only the tokenizer and the template)."""
    out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, out / f)
    if name.endswith(".json"):
        (out / name).write_text(json.dumps({"chat_template": template}))
    else:
        (out / name).write_text(template)
    return out


# --------------------------------------------------------------------------- passes


def test_the_tiny_checkpoint_passes_every_piece(model_dir: Path) -> None:
    report = check_chat_template(model_dir)
    assert report.checkpoint == model_dir
    assert report.sources == ("chat_template.jinja",)
    assert report.pieces == (*PIECES, "end of conversation")
    assert report.tokens > 100  # system + tools, image, call, response, answer
    assert report.seconds < 30


def test_without_tools_and_without_system_text(model_dir: Path) -> None:
    # A job with no tools: prompt and a direct answer only; an empty system turn is what the
    # template renders for an empty system message.
    for system in ("", "Be brief."):
        report = check_chat_template(model_dir, system=system, tools=[])
        assert report.pieces == ("prompt", "final answer turn", "end of conversation")
    # Tools and no system text: the tools block alone.
    assert check_chat_template(model_dir, system="").pieces[:3] == PIECES[:3]


def test_the_renderer_is_what_apply_chat_template_renders(model_dir: Path) -> None:
    """The check calls transformers' template renderer directly (no torch import); it must
    render what ``AutoTokenizer.apply_chat_template`` does, special tokens included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = _edited(
        "{{- '<|im_end|>\\n' }}\n    {%- elif", "{{- eos_token + '\\n' }}\n    {%- elif"
    )
    special = _special_tokens(model_dir)
    assert special["eos_token"] == "<|im_end|>"
    tools = list(SAMPLE_TOOLS)
    for stage in _stages("System.", tools):
        expected = tokenizer.apply_chat_template(
            stage.messages,
            tools=tools,
            chat_template=template,
            add_generation_prompt=stage.add_generation_prompt,
            tokenize=False,
        )
        assert _render(template, stage, tools, special) == expected


def test_a_template_writing_eos_token_passes(model_dir: Path, tmp_path: Path) -> None:
    # Templates that write <|im_end|> as {{ eos_token }} see the tokenizer's special tokens.
    template = _edited(
        "{{- '<|im_end|>\\n' }}\n    {%- elif", "{{- eos_token + '\\n' }}\n    {%- elif"
    )
    assert check_chat_template(with_template(model_dir, tmp_path / "eos", template)).tokens > 100


# --------------------------------------------------------------------------- fails clearly

DROPS_TOOL_RESPONSES = _edited(
    """    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
""",
    "    {%- elif message.role == 'tool' %}\n",
)
XML_TOOL_CALLS = _edited(
    """            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}
                {{- call.arguments }}
            {%- else %}
                {{- call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
""",
    """            {{- '<tool_call>\\n<function=' + call.name + '>\\n' }}
            {%- for key, value in call.arguments.items() %}
                {{- '<parameter=' + key + '>\\n' + (value | tojson) + '\\n</parameter>\\n' }}
            {%- endfor %}
            {{- '</function>\\n</tool_call>' }}
""",
)
INSTRUCT_GENERATION_PROMPT = _edited(
    "{{- '<|im_start|>assistant\\n<think>\\n' }}", "{{- '<|im_start|>assistant\\n' }}"
)
STRIPS_CALL_THINKING = _edited(
    "{%- if ns.multi_step_tool and message.role == 'user' %}",
    "{%- if ns.multi_step_tool and message.role in ('user', 'tool') %}",
)


@pytest.mark.parametrize(
    ("template", "piece", "rollout_text", "template_text"),
    [
        (DROPS_TOOL_RESPONSES, "tool-response delta", "user\\n<tool_response>", "assistant"),
        (XML_TOOL_CALLS, "tool-call turn", '{"name": "image', "<function=image"),
        (INSTRUCT_GENERATION_PROMPT, "prompt", "'<think>\\n'", "''"),
        (STRIPS_CALL_THINKING, "tool-call turn", "<think>\\nThe framed", "<tool_call>"),
    ],
    ids=["drops-tool-responses", "xml-tool-calls", "instruct-prompt", "strips-call-thinking"],
)
def test_a_template_that_differs_names_the_piece(
    model_dir: Path,
    tmp_path: Path,
    template: str,
    piece: str,
    rollout_text: str,
    template_text: str,
) -> None:
    bad = with_template(model_dir, tmp_path / "bad", template)
    with pytest.raises(TemplateMismatch) as caught:
        check_chat_template(bad)
    error = caught.value
    message = str(error)
    assert error.piece == piece
    assert error.source == "chat_template.jinja"
    assert error.checkpoint == bad
    assert error.position is not None
    assert error.position > 0
    assert f"{bad}: its chat template (chat_template.jinja)" in message
    assert f"cannot reproduce the rollout's {piece}: first differing token at position " in message
    # ~20 characters of both texts either side of the first difference, split at it.
    rollout_line, template_line = message.splitlines()[1:3]
    assert rollout_line.startswith("  rollout:  ")
    assert template_line.startswith("  template: ")
    assert rollout_text in rollout_line.split(" ^ ")[1], rollout_line
    assert template_text in template_line.split(" ^ ")[1], template_line


def test_the_position_is_the_first_differing_token(model_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    bad = with_template(model_dir, tmp_path / "bad", DROPS_TOOL_RESPONSES)
    with pytest.raises(TemplateMismatch) as caught:
        check_chat_template(bad)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stage = _stages(SAMPLE_SYSTEM, list(SAMPLE_TOOLS))[1]
    built = [i for _, text in stage.pieces for i in tokenizer.encode(text).ids]
    at = caught.value.position
    assert at is not None
    prompt_and_call = sum(len(tokenizer.encode(text).ids) for _, text in stage.pieces[:2])
    assert prompt_and_call < at < len(built)  # inside the delta
    good = tokenizer.encode(_render(CHAT_TEMPLATE, stage, list(SAMPLE_TOOLS), {})).ids
    assert built[:at] == good[:at]  # the rollout agrees with the good template up to there
    assert tokenizer.decode(built[at : at + 1], skip_special_tokens=False) == "user"


def test_tokens_are_compared_not_only_text(model_dir: Path, tmp_path: Path) -> None:
    # A tokenizer whose <|im_end|> swallows the whitespace after it: the template's text is
    # the rollout's, character for character, but its final "\n" is no token of its own.
    odd = with_template(model_dir, tmp_path / "odd", CHAT_TEMPLATE)
    config = json.loads((odd / "tokenizer.json").read_text())
    [im_end] = [t for t in config["added_tokens"] if t["content"] == "<|im_end|>"]
    im_end["rstrip"] = True
    (odd / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(TemplateMismatch, match="rollout's end of conversation") as caught:
        check_chat_template(odd)
    message = str(caught.value)
    assert "  rollout:  'n</answer><|im_end|>' ^ '\\n'" in message
    assert "  template: '</answer><|im_end|>\\n' ^ ''" in message  # "\n" inside <|im_end|>


def test_every_template_file_is_checked(model_dir: Path, tmp_path: Path) -> None:
    # A processor's chat_template.json that differs from the tokenizer's template is checked
    # too; one identical to it is reported together with it.
    bad = with_template(model_dir, tmp_path / "bad", CHAT_TEMPLATE)
    (bad / "chat_template.json").write_text(json.dumps({"chat_template": DROPS_TOOL_RESPONSES}))
    with pytest.raises(TemplateMismatch, match=r"\(chat_template\.json\)") as caught:
        check_chat_template(bad)
    assert caught.value.source == "chat_template.json"
    (bad / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    assert check_chat_template(bad).sources == ("chat_template.jinja, chat_template.json",)


def test_a_template_in_tokenizer_config_is_found(model_dir: Path, tmp_path: Path) -> None:
    bad = with_template(model_dir, tmp_path / "bad", "unused", name="unused.jinja")
    config = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": [{"name": "default", "template": XML_TOOL_CALLS}]})
    )
    with pytest.raises(TemplateMismatch, match=r"\(tokenizer_config\.json\)"):
        check_chat_template(bad)


def test_a_template_that_raises_names_the_rendering(model_dir: Path, tmp_path: Path) -> None:
    template = _edited(
        "    {%- elif message.role == 'tool' %}\n",
        "    {%- elif message.role == 'tool' %}\n        {{- raise_exception('no tools here') }}\n",
    )
    bad = with_template(model_dir, tmp_path / "bad", template)
    with pytest.raises(TemplateMismatch, match=r"fails on the sample conversation.*no tools here"):
        check_chat_template(bad)


def test_a_checkpoint_without_a_template_or_tokenizer_says_so(
    model_dir: Path, tmp_path: Path
) -> None:
    bare = with_template(model_dir, tmp_path / "bare", "", name="unused.jinja")
    with pytest.raises(FileNotFoundError, match=r"no chat template \(looked for chat_template"):
        check_chat_template(bare)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        check_chat_template(tmp_path)


# --------------------------------------------------------------------------- the worker


def _worker_settings(tmp_path: Path, tokenizer: Path) -> RolloutSettings:
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: t\nmodel: {tokenizer}\n")
    dead = RpcClientSettings(target="127.0.0.1:1", deadline_s=1.0)  # nothing listens there
    return RolloutSettings(
        job_spec=str(spec),
        inference=dead,
        tools=dead,
        verifier=dead,
        queue=QueueSettings(redis_url="redis://127.0.0.1:1/0"),
        health_timeout_s=0.2,
    )


def test_a_worker_refuses_to_start_on_a_template_it_cannot_reproduce(
    model_dir: Path, tmp_path: Path
) -> None:
    bad = with_template(model_dir, tmp_path / "bad", DROPS_TOOL_RESPONSES)
    with pytest.raises(TemplateMismatch, match="tool-response delta"):
        server.serve(_worker_settings(tmp_path, bad))
    # On the good checkpoint the check passes and the worker goes on to wait for its services.
    with pytest.raises(ServiceUnavailableError, match="not SERVING"):
        server.serve(_worker_settings(tmp_path, model_dir))


def test_the_worker_checks_with_the_job_system_prompt(model_dir: Path, tmp_path: Path) -> None:
    # The prompt is checked with the job's own system text: a template that trims it (as
    # newer Qwen templates do) fails on a system prompt that ends in a newline.
    trims = _edited(
        "{%- set system_text = render_content(messages[0].content) %}",
        "{%- set system_text = render_content(messages[0].content) | trim %}",
    )
    bad = with_template(model_dir, tmp_path / "trims", trims)
    spec = load_job_spec(_worker_settings(tmp_path, bad).job_spec)
    assert server.check_template(str(bad), spec).tokens > 100  # the default prompt: no newline
    assert spec.rollout.system_prompt == DEFAULT_SYSTEM_PROMPT
    folded = spec.model_copy(
        update={"rollout": spec.rollout.model_copy(update={"system_prompt": "Think.\n"})}
    )
    with pytest.raises(TemplateMismatch, match="rollout's prompt"):
        server.check_template(str(bad), folded)


def test_a_job_without_tools_is_checked_without_tool_turns(model_dir: Path, tmp_path: Path) -> None:
    # Its rollouts never append a tool response, so a template that drops them serves it.
    bad = with_template(model_dir, tmp_path / "bad", DROPS_TOOL_RESPONSES)
    spec = load_job_spec(_worker_settings(tmp_path, bad).job_spec)
    with pytest.raises(TemplateMismatch, match="tool-response delta"):
        server.check_template(str(bad), spec)
    no_tools = spec.model_copy(update={"rollout": spec.rollout.model_copy(update={"tools": []})})
    report = server.check_template(str(bad), no_tools)
    assert "tool-response delta" not in report.pieces
