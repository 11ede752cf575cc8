"""The bundled search corpus: the documents of :func:`axpo.study.knowledge.build_knowledge_base`.

``data/corpus.jsonl`` (what ``search`` indexes by default) and ``data/facts.jsonl`` (the facts,
for readers and other tools) are its output for seed 0, written by ``python -m
axpo_tools.knowledge`` (a test checks the shipped files are current). The generator lives in the
core (:mod:`axpo.study.knowledge`) because the ``town_facts`` task family asks about the same
facts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from axpo.study.knowledge import Fact, build_knowledge_base

__all__ = ["CORPUS_PATH", "FACTS_PATH", "build_knowledge_base", "load_facts", "write"]

DATA = Path(__file__).parent / "data"
CORPUS_PATH = DATA / "corpus.jsonl"
FACTS_PATH = DATA / "facts.jsonl"


def write(seed: int = 0) -> None:
    docs, facts = build_knowledge_base(seed)
    DATA.mkdir(exist_ok=True)
    CORPUS_PATH.write_text("".join(json.dumps(asdict(d)) + "\n" for d in docs))
    FACTS_PATH.write_text("".join(json.dumps(asdict(f)) + "\n" for f in facts))


def load_facts(path: Path = FACTS_PATH) -> list[Fact]:
    return [Fact(**json.loads(line)) for line in path.read_text().splitlines() if line]


if __name__ == "__main__":
    write()
    print(f"wrote {CORPUS_PATH} and {FACTS_PATH}")
