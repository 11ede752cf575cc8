"""Citations of the design notes stay inside the repository and point at something real.

Code comments, docstrings and READMEs cite the notes under ``docs/`` as ``docs/NAME.md``,
``docs/NAME.md, "Heading"`` or a Markdown link ``docs/NAME.md#anchor``. These tests fail when a
``.py`` or ``.md`` file of the repository cites a note that lives outside it (a path into a
sibling ``shared`` folder, or an upper-case note name without a folder, as the notes were
called before they moved into ``docs/``), when a cited ``docs/NAME.md`` does not exist, or when
the cited heading or anchor is not a heading of that file.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Notes outside the repository: a relative path into the sibling shared folder, or a bare
# upper-case note name.
OUTSIDE = re.compile(
    r"\.\./shared[/]|(?<![\w/.-])(?:DESIGN|PLATFORM|QWEN-FORMAT|STYLE)\.md\b",
)
# docs/NAME.md, optionally reached by ../ from the citing file, not part of a longer path.
CITATION = re.compile(r"(?<![\w/.-])((?:\.\./)*)docs/([\w.-]+\.md)(#[\w-]+)?")
# The section a citation names: `docs/NAME.md, "Heading"` (the quote may wrap lines).
SECTION = re.compile(r'\s*,\s*"([^"]{1,120})"')
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def repository_files() -> list[Path]:
    """The repository's ``.py`` and ``.md`` files (tracked or new, not ignored), outside
    node_modules, that exist on disk."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = [ROOT / p for p in out.split("\0") if p]
    return sorted(
        p
        for p in paths
        if p.suffix in (".py", ".md") and "node_modules" not in p.parts and p.is_file()
    )


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens.

    >>> slug("The stale tied `lm_head`")
    'the-stale-tied-lm_head'
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def headings(doc: Path) -> frozenset[str]:
    return frozenset(
        re.sub(r"\s+", " ", h.replace("`", "")).strip()
        for h in HEADING.findall(doc.read_text(encoding="utf-8"))
    )


def unwrap(text: str) -> str:
    """Join wrapped lines (and the ``#`` of wrapped comments) into single spaces."""
    return re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)


def citation_problems(path: Path, text: str) -> list[str]:
    """What is wrong with the citations in ``text`` (the contents of ``path``)."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in OUTSIDE.finditer(line):
            problems.append(
                f"{rel}:{lineno}: cites {m.group(0)!r}, a note outside the repository; "
                "cite docs/algorithm.md, docs/platform.md or docs/qwen-format.md instead"
            )
    for m in CITATION.finditer(text):
        lineno = text.count("\n", 0, m.start()) + 1
        up, name, anchor = m.groups()
        base = path.parent if up else ROOT
        doc = (base / up / "docs" / name).resolve()
        if not doc.is_file():
            problems.append(f"{rel}:{lineno}: cites docs/{name}, which does not exist")
            continue
        titles = headings(doc)
        if anchor and anchor[1:] not in {slug(t) for t in titles}:
            problems.append(f"{rel}:{lineno}: docs/{name} has no heading with anchor {anchor}")
        section = SECTION.match(unwrap(text[m.end() : m.end() + 200]))
        if section and not anchor and unwrap(section.group(1)) not in titles:
            problems.append(
                f"{rel}:{lineno}: docs/{name} has no heading {section.group(1)!r} "
                f"(its headings: {sorted(titles)})"
            )
    return problems


def test_docs_exist() -> None:
    for name in ("algorithm.md", "platform.md", "qwen-format.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"


def test_citations_point_inside_the_repository() -> None:
    files = repository_files()
    assert files, "git ls-files listed no .py/.md files"
    # This file is skipped: its examples of bad citations are bad on purpose.
    files = [f for f in files if f != Path(__file__).resolve()]
    problems = [p for f in files for p in citation_problems(f, f.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('x (docs/platform.md, "The stale tied lm_head")', ""),
        ('x (docs/platform.md, "The stale\n    # tied lm_head")', ""),
        ("see [it](../../docs/platform.md#the-stale-tied-lm_head)", ""),
        ("see docs/algorithm.md", ""),
        ("https://example.org/docs/anything.md", ""),
        ("(see ../" + "shared/PLAT" + "FORM.md)", "outside the repository"),
        ("(" + "DESIGN" + ".md section 1)", "outside the repository"),
        ("see docs/nowhere.md", "does not exist"),
        ('see docs/platform.md, "No such heading"', "no heading"),
        ("see docs/platform.md#no-such-anchor", "no heading with anchor"),
    ],
)
def test_citation_checker(text: str, expected: str) -> None:
    """The checker itself: good citations pass, each kind of bad one is reported."""
    problems = citation_problems(ROOT / "services" / "x" / "README.md", text)
    if expected:
        assert problems, f"{text!r} passed the checker"
        assert expected in problems[0], problems
    else:
        assert problems == []
