"""axpo.study.demos: demonstrations whose tool responses are the real tools' outputs, whose
direct answers are guesses, in the JSONL format ``axpo sft`` reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image as PILImage

from axpo.settings.tools import SearchSettings, ToolsSettings, ZoomSettings
from axpo.study.demos import write_demos
from axpo.study.families import colour_cell
from axpo.study.tasks import STUDY_FAMILIES, tasks_for
from axpo_tools.toolbox import Toolbox

SYSTEM = "You are a careful assistant."


@pytest.fixture(scope="module")
def toolbox() -> Iterator[Toolbox]:
    box = Toolbox(
        ToolsSettings(
            zoom=ZoomSettings(min_pixels=4096, max_pixels=4096, output_format="png"),
            search=SearchSettings(default_k=1, snippet_chars=200),
        )
    )
    box.start()
    yield box
    box.close()


def test_demonstrations(toolbox: Toolbox, tmp_path: Path) -> None:
    tasks = tasks_for(STUDY_FAMILIES, "train", 20, 256)
    path = tmp_path / "d" / "demos.jsonl"
    stats = write_demos(
        tasks,
        path,
        tools=toolbox.openai_specs(),
        system_prompt=SYSTEM,
        call_tool=toolbox.call,
        tool_rate=0.6,
        seed=3,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == stats.demos == 60
    assert stats.per_family == {f: 20 for f in STUDY_FAMILIES}
    tool_records = [r for r in records if len(r["messages"]) == 5]
    assert len(tool_records) == stats.tool_demos
    assert 0.4 < stats.tool_demos / 60 < 0.8
    by_id = {t.task_id: t for t in tasks}
    seen_families = set()
    for r in records:
        task = by_id[r["id"].rsplit("-", 1)[0]]
        system, user, first = r["messages"][:3]
        assert system == {"role": "system", "content": SYSTEM}
        assert {t["function"]["name"] for t in r["tools"]} == {
            "image_zoom_in_tool",
            "python",
            "search",
        }
        if task.image is not None:
            image_path = path.parent / user["content"][0]["image"]
            assert image_path.read_bytes() == task.image.data
        else:
            assert user["content"] == task.question
        if r not in tool_records:
            assert r["id"].endswith("-direct")
            assert "tool_calls" not in first
            continue
        seen_families.add(task.family)
        call = first["tool_calls"][0]["function"]
        assert call == {"name": task.tool, "arguments": dict(task.tool_arguments)}
        tool, last = r["messages"][3:]
        assert tool["role"] == "tool"
        assert last["content"] == f"<answer>{task.gold}</answer>"
        text = tool["content"][-1]["text"]
        if task.family == "arith":
            assert text.strip() == task.gold  # the real python tool's output
        elif task.family == "town_facts":
            assert task.gold in text  # the real search result holds the year
        else:
            crop = PILImage.open(path.parent / tool["content"][0]["image"]).convert("RGB")
            assert crop.size == (64, 64)
            assert crop.getpixel((0, 0)) == colour_cell.PALETTE[int(task.gold)][1]
    assert seen_families == set(STUDY_FAMILIES)
    # Deterministic: the same inputs give the same file.
    again = tmp_path / "e" / "demos.jsonl"
    write_demos(
        tasks,
        again,
        tools=toolbox.openai_specs(),
        system_prompt=SYSTEM,
        call_tool=toolbox.call,
        tool_rate=0.6,
        seed=3,
    )
    assert again.read_text() == path.read_text()


def test_a_family_whose_tool_is_not_offered_is_an_error(toolbox: Toolbox, tmp_path: Path) -> None:
    tools = [t for t in toolbox.openai_specs() if t["function"]["name"] != "python"]
    with pytest.raises(ValueError, match="its tool 'python' is not offered"):
        write_demos(
            tasks_for(["arith"], "train", 3, 256),
            tmp_path / "x.jsonl",
            tools=tools,
            system_prompt=SYSTEM,
            call_tool=toolbox.call,
            tool_rate=1.0,
        )
    with pytest.raises(ValueError, match="tool_rate"):
        write_demos(
            [],
            tmp_path / "y.jsonl",
            tools=tools,
            system_prompt="",
            call_tool=toolbox.call,
            tool_rate=1.5,
        )
