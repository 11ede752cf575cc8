"""``town_facts`` (search): a year that exists only in the bundled knowledge base.

"In what year was the town of Ulfenvel founded?": the towns, people and companies of
:mod:`axpo.study.knowledge` are invented, so only ``search`` (which indexes the same knowledge
base) finds the year; the model copies the entity's name into the query and the year from the
result into its answer. Questions ask for a year (a town's or company's founding, a person's
birth): 180 facts with answers in 800-2015 (chance: one in about 1,200). Text only: no image.

Split by content: every fourth entity of each kind is held out, the rest train, so a held-out
question asks about an entity no training question mentions.
"""

from __future__ import annotations

from functools import cache

from axpo.contracts.domain import AnswerKind
from axpo.study.knowledge import Fact, build_knowledge_base
from axpo.study.task import Split, Task, rng_for, split_of

FAMILY = "town_facts"
TOOL = "search"
ATTRIBUTES = {"town": "founded", "person": "born", "company": "founded"}
YEARS = 2015 - 800 + 1


def is_heldout(fact: Fact) -> bool:
    return int(fact.doc_id.rsplit("-", 1)[1]) % 4 == 0


@cache
def facts(split: Split) -> tuple[Fact, ...]:
    """The year facts of ``split``, in knowledge-base order."""
    _, all_facts = build_knowledge_base(0)
    chosen = [
        f
        for f in all_facts
        if ATTRIBUTES.get(f.doc_id.split("-")[0]) == f.attribute
        and is_heldout(f) == (split == "heldout")
    ]
    return tuple(chosen)


def generate(seed: int, image_size: int) -> Task:
    pool = facts(split_of(seed))
    fact = pool[rng_for(FAMILY, seed, 0).randrange(len(pool))]
    return Task(
        task_id=f"{FAMILY}-{seed}",
        question=f"{fact.question} Answer with the year.",
        image=None,
        gold=fact.answer,
        kind=AnswerKind.NUMBER,
        answer_text=fact.answer,
        family=FAMILY,
        seed=seed,
        tool=TOOL,
        tool_arguments={"query": fact.entity},
        chance=1 / YEARS,
    )
