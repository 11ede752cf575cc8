"""Search: relevance on the shipped corpus, argument checks, the HTTP backend on a real server."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from axpo.contracts.domain import ToolErrorKind
from axpo.settings.tools import SearchSettings
from axpo_tools import knowledge
from axpo_tools.errors import ToolFailure
from axpo_tools.search import SearchTool


@pytest.fixture(scope="module")
def search() -> SearchTool:
    return SearchTool(SearchSettings())


def test_shipped_knowledge_base_is_current():
    docs, facts = knowledge.build_knowledge_base(0)
    shipped_docs = [json.loads(x) for x in knowledge.CORPUS_PATH.read_text().splitlines()]
    assert shipped_docs == [asdict(d) for d in docs]
    assert knowledge.load_facts() == facts


def test_every_fact_is_found_in_the_top_three(search):
    facts = knowledge.load_facts()
    found = sum(f.doc_id in [h.doc_id for h in search.backend.search(f.question, 3)] for f in facts)
    assert found / len(facts) >= 0.95, f"recall@3 = {found / len(facts):.3f}"


def test_answer_text_appears_in_the_result(search):
    fact = next(f for f in knowledge.load_facts() if f.attribute == "river")
    result = search({"query": fact.question})
    assert fact.answer in result.text
    assert result.text.startswith("1. ")


def test_k_limits_the_results(search):
    assert search({"query": "town founded river", "k": 2}).text.count("\n\n") == 1


def test_no_results_is_a_plain_answer(search):
    assert search({"query": "zzzqqqxxx"}).text == "No results for 'zzzqqqxxx'."


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"query": ""}, "non-empty"),
        ({"query": 3}, "non-empty"),
        ({"query": "x" * 600}, "longer"),
        ({"query": "a", "k": 0}, "k must"),
        ({"query": "a", "k": 99}, "k must"),
    ],
    ids=["empty", "type", "long", "k-zero", "k-big"],
)
def test_bad_arguments(search, args, message):
    with pytest.raises(ToolFailure, match=message) as err:
        search(args)
    assert err.value.kind is ToolErrorKind.BAD_ARGUMENTS


def test_custom_corpus(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        '{"id": "a", "title": "Zorblax", "text": "Zorblax has nine moons."}\n'
        '{"id": "b", "title": "Other", "text": "Nothing here."}\n'
    )
    tool = SearchTool(SearchSettings(corpus_path=str(corpus)))
    assert "nine moons" in tool({"query": "How many moons does Zorblax have?"}).text


def test_corpus_without_fields_is_refused(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="line 1 needs 'title' and 'text'"):
        SearchTool(SearchSettings(corpus_path=str(corpus)))


class _SearchService(BaseHTTPRequestHandler):
    def do_GET(self):
        query = parse_qs(urlparse(self.path).query)
        if query["q"][0] == "broken":
            body = b"not json"
        else:
            hits = [{"name": f"Doc {i}", "body": f"about {query['q'][0]}"} for i in range(5)]
            body = json.dumps({"data": {"hits": hits[: int(query["k"][0])]}}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SearchService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/search"
    server.shutdown()
    server.server_close()


def test_http_backend_maps_the_response(http_service):
    tool = SearchTool(
        SearchSettings(
            backend="http",
            http_url=http_service,
            http_results_path="data.hits",
            http_title_field="name",
            http_snippet_field="body",
        )
    )
    text = tool({"query": "comets", "k": 2}).text
    assert text == "1. Doc 0\nabout comets\n\n2. Doc 1\nabout comets"
    with pytest.raises(ToolFailure) as err:
        tool({"query": "broken"})
    assert err.value.kind is ToolErrorKind.INTERNAL


def test_http_backend_unreachable():
    tool = SearchTool(
        SearchSettings(backend="http", http_url="http://127.0.0.1:9/x", http_timeout_s=1)
    )
    with pytest.raises(ToolFailure, match="search service failed"):
        tool({"query": "a"})


def test_http_backend_needs_a_url():
    with pytest.raises(ValueError, match="http_url"):
        SearchTool(SearchSettings(backend="http"))
