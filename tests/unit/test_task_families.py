"""The study's task families: deterministic, split into disjoint train and held-out content,
answerable by their tool (the tool's real code), and hidden without it where that is by
construction (colour_cell under a 64x64 pixel budget)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image as PILImage

from axpo.contracts.domain import AnswerKind
from axpo.settings.job import JobSpec, TaskSpec
from axpo.study.families import arith, colour_cell
from axpo.study.task import HELDOUT_BASE, split_of, split_seeds
from axpo.study.tasks import STUDY_FAMILIES, generate_task, task_data, task_from_data, tasks_for

SIZE = 256


@pytest.mark.parametrize("family", STUDY_FAMILIES)
def test_deterministic_and_well_formed(family: str) -> None:
    a = generate_task(family, 11, SIZE)
    assert a == generate_task(family, 11, SIZE)
    assert a.family == family
    assert a.seed == 11
    assert a.split == "train"
    assert a.kind == AnswerKind.NUMBER
    assert a.gold.isdigit()
    assert a.tool in {"image_zoom_in_tool", "python", "search"}
    assert 0 < a.chance <= 1 / 6
    others = {generate_task(family, s, SIZE).question for s in range(12, 40)}
    assert len(others) > 10  # seeds give different questions


def test_split_seeds() -> None:
    assert split_seeds("train", 3) == [0, 1, 2]
    assert split_seeds("heldout", 2, start=5) == [HELDOUT_BASE + 5, HELDOUT_BASE + 6]
    assert split_of(HELDOUT_BASE - 1) == "train"
    assert split_of(HELDOUT_BASE) == "heldout"
    with pytest.raises(ValueError, match="unknown split"):
        split_seeds("test", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="training seeds end"):
        split_seeds("train", 10, start=HELDOUT_BASE - 5)
    with pytest.raises(ValueError, match=">= 0"):
        generate_task("arith", -1, SIZE)


def test_arith_splits_share_no_question() -> None:
    train = {t.question for t in tasks_for(["arith"], "train", 3000, SIZE)}
    heldout = {t.question for t in tasks_for(["arith"], "heldout", 1000, SIZE)}
    assert len(train) > 1500
    assert len(heldout) > 500
    assert not train & heldout
    for t in tasks_for(["arith"], "heldout", 50, SIZE):
        a, b = map(int, t.question.split("?")[0].split("is ")[1].split(" * "))
        assert arith.heldout_pair(a, b)
        assert int(t.gold) == a * b


def test_town_facts_splits_share_no_entity() -> None:
    train = tasks_for(["town_facts"], "train", 2000, SIZE)
    heldout = tasks_for(["town_facts"], "heldout", 500, SIZE)
    train_entities = {t.tool_arguments["query"] for t in train}
    heldout_entities = {t.tool_arguments["query"] for t in heldout}
    assert len(train_entities) > 100
    assert len(heldout_entities) > 30
    assert not train_entities & heldout_entities
    for t in heldout[:20]:
        assert t.tool_arguments["query"] in t.question
        assert 800 <= int(t.gold) <= 2015


def test_town_facts_answers_are_in_the_search_corpus() -> None:
    from axpo.study.knowledge import build_knowledge_base

    docs, _ = build_knowledge_base(0)
    text = {d.title: d.text for d in docs}
    for t in tasks_for(["town_facts"], "train", 30, SIZE):
        assert t.gold in text[t.tool_arguments["query"]]


def _pixels(data: bytes) -> PILImage.Image:
    return PILImage.open(io.BytesIO(data)).convert("RGB")


def test_colour_cell_pattern_shows_the_colour_at_full_size_only() -> None:
    task = generate_task("colour_cell", 5, SIZE)
    assert task.image is not None
    img = _pixels(task.image.data)
    x1, y1, x2, y2 = (v * SIZE // 1000 for v in task.tool_arguments["bbox_2d"])
    assert (x2 - x1, y2 - y1) == (SIZE // 4, SIZE // 4)
    rgb = colour_cell.PALETTE[int(task.gold)][1]
    assert img.getpixel((x1, y1)) == rgb  # the cell's checkerboard starts with its colour
    assert img.getpixel((x1 + 2, y1)) == tuple(255 - v for v in rgb)
    # Averaged over 4x4 pixels (what a 4x downscale does), every cell is the same grey.
    small = img.reduce(4)
    values = set(small.tobytes())
    assert values <= {127, 128}, sorted(values)[:5]


def test_colour_cell_is_hidden_by_the_processor_budget_and_shown_by_the_crop(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Through the model's own image processor (a 64x64 budget): the whole image carries no
    colour; the zoom tool's crop of the named cell does, and it differs between colours."""
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor

    from axpo.study.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("cc") / "m", max_pixels=64 * 64)
    proc = AutoImageProcessor.from_pretrained(model)
    task = generate_task("colour_cell", 7, SIZE)
    assert task.image is not None
    img = _pixels(task.image.data)
    overview = proc(images=[img], return_tensors="pt")["pixel_values"]
    assert overview.shape[0] == 16  # 64x64: 4x4 patches
    assert float(overview.abs().max()) < 0.1  # flat grey (normalized: 0), no colour left
    x1, y1, x2, y2 = (v * SIZE // 1000 for v in task.tool_arguments["bbox_2d"])
    crop = proc(images=[img.crop((x1, y1, x2, y2))], return_tensors="pt")["pixel_values"]
    assert float(crop.std()) > 0.3  # the pattern survives in the crop


def test_task_spec_mixes_families_and_splits() -> None:
    spec = TaskSpec(family=["colour_cell", "arith", "town_facts"], count=5, image_size=SIZE)
    datas = [task_data(spec, i) for i in range(6)]
    assert [d["family"] for d in datas] == ["colour_cell", "arith", "town_facts"] * 2
    assert [d["seed"] for d in datas] == [0, 0, 0, 1, 1, 1]
    held = TaskSpec(family="arith", split="heldout", count=3)
    assert [task_data(held, i)["seed"] for i in range(4)] == [
        HELDOUT_BASE,
        HELDOUT_BASE + 1,
        HELDOUT_BASE + 2,
        HELDOUT_BASE,
    ]
    assert task_from_data(json.loads(json.dumps(datas[1]))).family == "arith"
    with pytest.raises(ValueError, match="multiple of 128"):
        TaskSpec(family="colour_cell", image_size=192)
    with pytest.raises(ValueError, match="twice"):
        TaskSpec(family=["arith", "arith"])
    with pytest.raises(ValueError, match="1,000,000"):
        TaskSpec(count=10, seed=999_995)
    JobSpec(name="j", model="m", tasks={"family": ["town_facts"]})  # a list is a valid job field
