"""The knowledge base: fictional towns, people and companies with checkable facts.

The facts are invented on purpose, so a model cannot know them from pre-training: a question
about them is answered by searching. ``build_knowledge_base(seed)`` is deterministic. The tool
server's ``search`` indexes its documents (``axpo_tools/data/corpus.jsonl``, written by
``python -m axpo_tools.knowledge``; a test checks the shipped file is current), and the
``town_facts`` task family (:mod:`axpo.study.families.town_facts`) asks about its facts.
Pure Python.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = (
    "ka",
    "vel",
    "mo",
    "ra",
    "tor",
    "lin",
    "sa",
    "dre",
    "quo",
    "ne",
    "bar",
    "ith",
    "ul",
    "fen",
    "gar",
    "os",
    "mir",
    "tha",
    "zen",
    "lo",
    "pra",
    "wick",
    "dun",
    "ely",
)
_REGIONS = ("Aldmark", "Brevia", "Corland", "Dunesse", "Eskaria", "Fenwold")
_FIELDS = ("botany", "optics", "glaciology", "cartography", "acoustics", "metallurgy")
_PRODUCTS = (
    "bicycles",
    "telescopes",
    "ceramic tiles",
    "weather balloons",
    "pocket watches",
    "river barges",
    "paper lanterns",
    "violin strings",
)


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Fact:
    """One checkable fact: ``question`` has the single answer ``answer`` of ``kind``."""

    doc_id: str
    entity: str
    attribute: str
    question: str
    answer: str
    kind: str  # "number" or "text"


def _name(rng: random.Random, used: set[str], parts: int) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()
        if name not in used and len(name) >= 4:
            used.add(name)
            return name


def build_knowledge_base(
    seed: int = 0, towns: int = 60, people: int = 60, companies: int = 60
) -> tuple[list[Document], list[Fact]]:
    rng = random.Random(seed)
    used: set[str] = set()
    docs: list[Document] = []
    facts: list[Fact] = []
    town_names = [_name(rng, used, 3) for _ in range(towns)]
    for i, town in enumerate(town_names):
        region = rng.choice(_REGIONS)
        founded = rng.randint(900, 1890)
        population = rng.randint(1_200, 480_000)
        river = _name(rng, used, 2) + " River"
        twin = town_names[(i + 7) % towns]
        doc_id = f"town-{i:03d}"
        docs.append(
            Document(
                doc_id,
                town,
                (
                    f"{town} is a town in the region of {region}. "
                    f"It was founded in {founded} on the "
                    f"banks of the {river}. As of the last census it had a population of "
                    f"{population:,}. {town} is twinned with {twin}."
                ),
            )
        )
        facts += [
            Fact(
                doc_id,
                town,
                "founded",
                f"In what year was the town of {town} founded?",
                str(founded),
                "number",
            ),
            Fact(
                doc_id,
                town,
                "population",
                f"What is the population of {town}?",
                str(population),
                "number",
            ),
            Fact(doc_id, town, "river", f"On which river does {town} lie?", river, "text"),
            Fact(doc_id, town, "region", f"In which region is {town}?", region, "text"),
        ]
    for i in range(people):
        person = f"{_name(rng, used, 2)} {_name(rng, used, 3)}"
        born = rng.randint(1780, 1990)
        field = rng.choice(_FIELDS)
        hometown = rng.choice(town_names)
        prize_year = born + rng.randint(28, 70)
        doc_id = f"person-{i:03d}"
        docs.append(
            Document(
                doc_id,
                person,
                (
                    f"{person} (born {born} in {hometown}) is a scientist "
                    f"known for work in {field}. "
                    f"{person.split()[1]} received the {_REGIONS[i % len(_REGIONS)]} Medal in "
                    f"{prize_year}."
                ),
            )
        )
        facts += [
            Fact(doc_id, person, "born", f"In what year was {person} born?", str(born), "number"),
            Fact(doc_id, person, "field", f"In which field did {person} work?", field, "text"),
            Fact(doc_id, person, "hometown", f"In which town was {person} born?", hometown, "text"),
            Fact(
                doc_id,
                person,
                "medal",
                f"In what year did {person} receive a medal?",
                str(prize_year),
                "number",
            ),
        ]
    for i in range(companies):
        company = f"{_name(rng, used, 2)} {rng.choice(['Works', 'Company', 'Guild', 'Ltd'])}"
        founded = rng.randint(1800, 2015)
        product = rng.choice(_PRODUCTS)
        hq = rng.choice(town_names)
        staff = rng.randint(12, 9_000)
        doc_id = f"company-{i:03d}"
        docs.append(
            Document(
                doc_id,
                company,
                (
                    f"{company} is a manufacturer of {product} headquartered in {hq}. Founded in "
                    f"{founded}, it employs {staff:,} people."
                ),
            )
        )
        facts += [
            Fact(
                doc_id,
                company,
                "founded",
                f"In what year was {company} founded?",
                str(founded),
                "number",
            ),
            Fact(doc_id, company, "product", f"What does {company} make?", product, "text"),
            Fact(
                doc_id,
                company,
                "headquarters",
                f"In which town is {company} headquartered?",
                hq,
                "text",
            ),
            Fact(
                doc_id,
                company,
                "employees",
                f"How many people does {company} employ?",
                str(staff),
                "number",
            ),
        ]
    return docs, facts
