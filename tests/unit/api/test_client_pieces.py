"""The client's and the api's pieces that need no server: SSE parsing, the retry policy and
which errors it retries (httpx MockTransport: the edge is faked, the client is real), typed
errors, YAML specs, the progress line, token buckets, settings, dotted error paths."""

from __future__ import annotations

import httpx
import pytest

from axpo.settings.api import ApiSettings
from axpo_api.auth import Auth, TokenBuckets
from axpo_api.problems import dotted
from axpo_client import (
    ApiError,
    AuthError,
    Client,
    Conflict,
    NotFound,
    RetryPolicy,
    ValidationError,
    load_spec,
)
from axpo_client.progress import summary
from axpo_client.sse import RawEvent, SseParser

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002)
JOB = {
    "id": "t-1",
    "name": "t",
    "state": "queued",
    "spec": {},
    "steps": 3,
    "step": 0,
    "policy_version": 0,
    "last_step": None,
    "error": None,
    "cancel_requested": False,
    "created_at": "2026-12-06T00:00:00Z",
    "started_at": None,
    "ended_at": None,
}


def test_sse_parser_reads_fields_comments_and_multiline_data():
    p = SseParser()
    lines = [": ping", "", "id: 5-0", "event: step", "data: {", "data: }", "", "data: x", ""]
    events = [e for e in (p.feed(line) for line in lines) if e is not None]
    assert events == [RawEvent("5-0", "step", "{\n}"), RawEvent(None, "message", "x")]


def _client(handler) -> Client:
    return Client("http://api", token="t", retry=FAST, transport=httpx.MockTransport(handler))


def test_gets_are_retried_on_gateway_errors_and_connection_errors():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(503)
        return httpx.Response(200, json=JOB)

    assert _client(handler).get("t-1").id == "t-1"
    assert len(calls) == 3
    assert calls[0].headers["authorization"] == "Bearer t"


def test_retries_stop_after_max_attempts_and_500_is_not_retried():
    calls = []

    def gateway(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(502)

    with pytest.raises(ApiError) as caught:
        _client(gateway).get("t-1")
    assert caught.value.status == 502
    assert len(calls) == FAST.max_attempts
    calls.clear()

    def bug(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, json={"title": "Internal Server Error", "status": 500})

    with pytest.raises(ApiError):
        _client(bug).get("t-1")
    assert len(calls) == 1


def test_submit_carries_an_idempotency_key_so_its_retries_are_safe():
    keys = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        return httpx.Response(504) if len(keys) == 1 else httpx.Response(201, json=JOB)

    _client(handler).submit({"name": "t", "model": "m"})
    assert len(keys) == 2
    assert keys[0]
    assert keys[0] == keys[1]


def test_a_post_without_idempotency_key_is_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503)

    client = _client(handler)
    with pytest.raises(ApiError):
        client._request("POST", "/v1/other")
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, AuthError), (403, AuthError), (404, NotFound), (409, Conflict), (422, ValidationError)],
)
def test_errors_are_typed(status, cls):
    problem = {
        "title": "x",
        "status": status,
        "detail": "why",
        "errors": [{"loc": "algorithm.rho", "msg": "too big", "type": "le"}],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, json=problem, headers={"content-type": "application/problem+json"}
        )

    with pytest.raises(cls) as caught:
        _client(handler).get("t-1")
    assert caught.value.status == status
    assert "why" in str(caught.value)
    if cls is ValidationError:
        assert [f.loc for f in caught.value.fields] == ["algorithm.rho"]
        assert "algorithm.rho: too big" in str(caught.value)


def test_load_spec_reads_yaml_and_says_what_is_wrong(tmp_path):
    good = tmp_path / "job.yaml"
    good.write_text("name: t\nmodel: m\nsteps: 2\n")
    assert load_spec(good) == {"name": "t", "model": "m", "steps": 2}
    assert load_spec({"name": "t"}) == {"name": "t"}
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_spec(listed)
    with pytest.raises(ValueError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_progress_line():
    line = summary(
        "job", 4, 10, {"reward_mean": 0.5, "tool_call_rate": 0.25, "all_wrong_tool_rate": 0.1}, 3725
    )
    assert line == "job step 4/10 reward 0.50 tool-call rate 0.25 all-wrong rate 0.10 ETA 1h02m"


def test_token_bucket_allows_a_burst_then_the_rate():
    buckets = TokenBuckets(rate=1000.0, burst=3)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") > 0  # empty
    assert buckets.take("b") == 0.0  # per key


def test_auth_checks_against_every_token():
    auth = Auth(["one", "two"], TokenBuckets(1.0, 1))
    assert auth.check("one")
    assert auth.check("two")
    assert not auth.check("three")
    assert not auth.check("")
    assert not auth.check("one ")
    with pytest.raises(ValueError, match="no api token"):
        Auth([], TokenBuckets(1.0, 1))


def test_settings_read_tokens_from_a_comma_list_and_a_file(monkeypatch, tmp_path):
    secret = tmp_path / "tokens"
    secret.write_text("# mounted secret\nthree\n\nfour\n")
    monkeypatch.setenv("AXPO_API_TOKENS", "one, two,,")
    monkeypatch.setenv("AXPO_API_TOKENS_FILE", str(secret))
    settings = ApiSettings()
    assert settings.tokens == ("one", "two")
    assert settings.all_tokens() == ("one", "two", "three", "four")
    monkeypatch.delenv("AXPO_API_TOKENS")
    monkeypatch.delenv("AXPO_API_TOKENS_FILE")
    with pytest.raises(ValueError, match="AXPO_API_TOKENS"):
        ApiSettings().all_tokens()


def test_dotted_paths():
    assert dotted(("body", "algorithm", "rho")) == "algorithm.rho"
    assert dotted(("query", "limit")) == "query.limit"
    assert dotted(("body", "rollout", "tools", 0)) == "rollout.tools.0"
    assert dotted(("body",)) == "(body)"
