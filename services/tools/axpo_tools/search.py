"""``search``: BM25 over a local corpus (bm25s), or a real search service over HTTP.

The local backend indexes a JSONL corpus (``{"id", "title", "text"}`` per line; by default the
bundled knowledge base, ``axpo_tools/data/corpus.jsonl``) once at start-up. The HTTP backend
calls ``GET <url>?q=<query>&k=<k>`` and maps the JSON response to results with configurable
field names; it is off by default.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from axpo.contracts.domain import ToolErrorKind, ToolResult
from axpo.settings.tools import SearchSettings
from axpo_tools.errors import ToolFailure
from axpo_tools.knowledge import CORPUS_PATH

NAME = "search"
MAX_QUERY_CHARS = 500


@dataclass(frozen=True)
class Hit:
    title: str
    snippet: str
    score: float
    doc_id: str = ""


class SearchBackend(Protocol):
    def search(self, query: str, k: int) -> list[Hit]: ...


class BM25Backend:
    """bm25s over a JSONL corpus; read-only after construction, so thread-safe."""

    def __init__(self, corpus_path: Path, snippet_chars: int) -> None:
        import bm25s  # late: a server without the search tool does not pay for it

        self._bm25s = bm25s
        self.docs = [json.loads(line) for line in corpus_path.read_text().splitlines() if line]
        for i, doc in enumerate(self.docs):
            if not {"title", "text"} <= doc.keys():
                raise ValueError(f"{corpus_path}: line {i + 1} needs 'title' and 'text'")
        self.snippet_chars = snippet_chars
        texts = [f"{d['title']}\n{d['text']}" for d in self.docs]
        tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)
        self.vocabulary = {t for doc in tokens for t in doc}
        self._retriever = bm25s.BM25()
        self._retriever.index(tokens, show_progress=False)

    def search(self, query: str, k: int) -> list[Hit]:
        words = self._bm25s.tokenize(query, stopwords="en", show_progress=False, return_ids=False)[
            0
        ]
        words = [w for w in words if w in self.vocabulary]
        if not words:
            return []
        k = min(k, len(self.docs))
        ids, scores = self._retriever.retrieve([words], k=k, show_progress=False, n_threads=1)
        hits = []
        for i, score in zip(ids[0], scores[0], strict=True):
            if score <= 0:
                continue
            doc = self.docs[int(i)]
            hits.append(
                Hit(
                    doc["title"],
                    _snippet(doc["text"], self.snippet_chars),
                    float(score),
                    str(doc.get("id", "")),
                )
            )
        return hits


class HttpBackend:
    """A real search service: ``GET url?q=...&k=...`` returning JSON."""

    def __init__(self, settings: SearchSettings) -> None:
        if not settings.http_url:
            raise ValueError("search.http_url must be set for the http backend")
        self.settings = settings

    def search(self, query: str, k: int) -> list[Hit]:
        s = self.settings
        assert s.http_url is not None
        sep = "&" if "?" in s.http_url else "?"
        url = f"{s.http_url}{sep}{urllib.parse.urlencode({'q': query, 'k': k})}"
        try:
            with urllib.request.urlopen(url, timeout=s.http_timeout_s) as response:
                body = json.loads(response.read(4 << 20))
        except TimeoutError as exc:
            raise ToolFailure(ToolErrorKind.TIMEOUT, "search service timed out") from exc
        except (OSError, ValueError) as exc:
            raise ToolFailure(ToolErrorKind.INTERNAL, f"search service failed: {exc}") from exc
        results: Any = body
        for part in filter(None, s.http_results_path.split(".")):
            results = results.get(part) if isinstance(results, dict) else None
        if not isinstance(results, list):
            raise ToolFailure(
                ToolErrorKind.INTERNAL,
                f"search service response has no list at {s.http_results_path!r}",
            )
        hits = []
        for r in results[:k]:
            if isinstance(r, dict):
                hits.append(
                    Hit(
                        str(r.get(s.http_title_field, "")),
                        _snippet(str(r.get(s.http_snippet_field, "")), s.snippet_chars),
                        float(r.get("score", 0.0) or 0.0),
                    )
                )
        return hits


def _snippet(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1].rsplit(" ", 1)[0] + "…"


class SearchTool:
    name = NAME

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.backend: SearchBackend
        if settings.backend == "http":
            self.backend = HttpBackend(settings)
        else:
            path = Path(settings.corpus_path) if settings.corpus_path else CORPUS_PATH
            self.backend = BM25Backend(path, settings.snippet_chars)

    def spec(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": NAME,
                "description": "Search a knowledge base; returns the best matching documents "
                "with title and snippet.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "description": "What to look for."},
                        "k": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": self.settings.max_k,
                            "description": f"How many results (default {self.settings.default_k}).",
                        },
                    },
                    "required": ["query"],
                },
            },
        }

    def __call__(self, arguments: Mapping[str, Any], images: object = ()) -> ToolResult:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, "query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS, f"query is longer than {MAX_QUERY_CHARS} characters"
            )
        k = arguments.get("k", self.settings.default_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.settings.max_k:
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS,
                f"k must be an integer from 1 to {self.settings.max_k}, got {k!r}",
            )
        hits = self.backend.search(query, k)
        if not hits:
            return ToolResult(text=f"No results for {query!r}.")
        lines = [f"{i}. {h.title}\n{h.snippet}" for i, h in enumerate(hits, 1)]
        return ToolResult(text="\n\n".join(lines))
