"""The api over real HTTP (uvicorn on port 0, real Redis) and the Python client against it:
auth on every route, idempotent submit, 422 naming field paths, 409 on cancelling a finished
job, SSE resume with Last-Event-ID, limits (413, 429), request ids, readiness, metrics."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from axpo.jobs import JobState
from axpo_client import (
    AsyncClient,
    AuthError,
    Client,
    Conflict,
    NotFound,
    ValidationError,
)
from tests.integration import api_fixtures, redis_fixtures
from tests.integration.api_fixtures import OTHER_TOKEN, TOKEN, spec, start_api

redis_server = redis_fixtures.redis_server
api = api_fixtures.api

pytestmark = pytest.mark.integration

ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/x-1"),
    ("POST", "/v1/jobs/x-1/cancel"),
    ("GET", "/v1/jobs/x-1/metrics"),
    ("GET", "/v1/jobs/x-1/checkpoints"),
    ("GET", "/v1/jobs/x-1/events"),
    ("GET", "/metrics"),
]


def test_every_route_but_health_needs_a_valid_token(api):
    with httpx.Client(base_url=api.url) as http:
        for method, path in ROUTES:
            missing = http.request(method, path, json=spec())
            assert missing.status_code == 401, (method, path)
            assert missing.headers["content-type"] == "application/problem+json"
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = http.request(method, path, json=spec(), headers=api.headers("not-a-token"))
            assert wrong.status_code == 403, (method, path)
            basic = http.request(method, path, headers={"Authorization": "Basic eDp5"})
            assert basic.status_code == 401, (method, path)
            ok = http.request(method, path, json=spec(), headers=api.headers(OTHER_TOKEN))
            assert ok.status_code not in (401, 403), (method, path)
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert http.get(path).status_code == 200, path


def test_readyz_reports_redis(api):
    with httpx.Client(base_url=api.url) as http:
        assert http.get("/readyz").json() == {"status": "ok", "redis": True}


def test_submit_is_idempotent_with_a_key(api):
    with httpx.Client(base_url=api.url, headers=api.headers()) as http:
        first = http.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": "abc"})
        again = http.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": "abc"})
        assert first.status_code == 201
        assert again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        assert first.json()["id"] == again.json()["id"]
        assert first.headers["location"] == f"/v1/jobs/{first.json()['id']}"
        other = http.post("/v1/jobs", json=spec(steps=7), headers={"Idempotency-Key": "abc"})
        assert other.status_code == 409
        assert "different spec" in other.json()["detail"]
        # The same key from another token is another caller's key.
        theirs = http.post(
            "/v1/jobs", json=spec(), headers={"Idempotency-Key": "abc", **api.headers(OTHER_TOKEN)}
        )
        assert theirs.status_code == 201
        assert theirs.json()["id"] != first.json()["id"]
        assert len(http.get("/v1/jobs").json()["items"]) == 2


def test_an_invalid_spec_is_a_422_naming_every_field(api):
    bad = {"name": "has space", "model": "m", "algorithm": {"rho": 2, "nope": 1}, "steps": 0}
    with httpx.Client(base_url=api.url, headers=api.headers()) as http:
        resp = http.post("/v1/jobs", json=bad)
        assert resp.status_code == 422
        assert resp.headers["content-type"] == "application/problem+json"
        body = resp.json()
        locs = {e["loc"] for e in body["errors"]}
        assert locs == {"name", "algorithm.rho", "algorithm.nope", "steps"}
        assert "algorithm.rho" in body["detail"]
        assert body["status"] == 422
        assert body["request_id"] == resp.headers["x-request-id"]
        not_json = http.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
        assert not_json.status_code == 422
        assert http.get("/v1/jobs", params={"limit": 0}).json()["errors"][0]["loc"] == "query.limit"
    with Client(api.url, token=TOKEN) as client, pytest.raises(ValidationError) as caught:
        client.submit(bad)
    assert {f.loc for f in caught.value.fields} == locs


def test_cancel_of_a_finished_job_is_a_409_and_a_queued_one_is_cancelled(api):
    with Client(api.url, token=TOKEN) as client:
        queued = client.submit(spec())
        assert client.cancel(queued.id).state == JobState.CANCELLED
        with pytest.raises(Conflict, match="already cancelled"):
            client.cancel(queued.id)
        running = client.submit(spec())
        api.store.mark_running(running.id)
        after = client.cancel(running.id)
        assert after.state == JobState.RUNNING
        assert after.cancel_requested
        assert api.store.cancel_requested(running.id)
        with pytest.raises(NotFound):
            client.cancel("no-such-job")
        with pytest.raises(AuthError):
            Client(api.url, token="wrong").get(running.id)


def _frames(text: str) -> list[dict[str, str]]:
    frames = []
    for block in text.strip().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if fields:
            frames.append(fields)
    return frames


def test_sse_resume_with_last_event_id_loses_no_event(api):
    with Client(api.url, token=TOKEN) as client:
        job = client.submit(spec(steps=40))
    store = api.store
    store.mark_running(job.id)
    stop = threading.Event()

    def learner() -> None:  # steps are written while watchers come and go
        for s in range(1, 41):
            store.record_step(job.id, {"step": float(s), "policy_version": float(s)})
            time.sleep(0.005)
        store.finish(job.id, JobState.SUCCEEDED)
        stop.set()

    thread = threading.Thread(target=learner)
    thread.start()
    seen: list[str] = []
    last: str | None = None
    with httpx.Client(base_url=api.url, headers=api.headers()) as http:
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            # Read a few events, then drop the connection, as a flaky network would.
            with http.stream("GET", f"/v1/jobs/{job.id}/events", headers=headers) as resp:
                if resp.status_code == 204:
                    break
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                buffer = ""
                for chunk in resp.iter_text():
                    buffer += chunk
                    frames = _frames(buffer) if buffer.endswith("\n\n") else []
                    if len(frames) >= 3:
                        break
                for frame in _frames(buffer.rsplit("\n\n", 1)[0] + "\n\n"):
                    seen.append(frame["id"])
                    last = frame["id"]
    thread.join()
    everything = [e.id for e in store.events(job.id, count=1000)]
    assert seen == everything  # every event once, in order
    assert len(everything) == 43  # queued, running, 40 steps, succeeded


def test_client_events_reconnect_and_end_after_the_final_state(api):
    with Client(api.url, token=TOKEN) as client:
        job = client.submit(spec(steps=5))
        api.store.mark_running(job.id)
        for s in range(1, 6):
            api.store.record_step(job.id, {"step": float(s), "policy_version": float(s)})
        events = client.events(job.id)
        first = [next(events) for _ in range(4)]
        events.close()
        api.store.finish(job.id, JobState.SUCCEEDED)
        rest = list(client.events(job.id, after=first[-1].id))
        ids = [e.id for e in first + rest]
        assert ids == [e.id for e in api.store.events(job.id, count=100)]
        assert rest[-1].final
        assert list(client.events(job.id, after=rest[-1].id)) == []  # 204: nothing follows
        final = client.wait(job.id, progress=False)
        assert final.state == JobState.SUCCEEDED
        assert final.step == 5
        assert [r["step"] for r in client.metrics(job.id)] == [1, 2, 3, 4, 5]


def test_wait_shows_progress_and_returns_the_final_job(api, capsys):
    with Client(api.url, token=TOKEN) as client:
        job = client.submit(spec(steps=3))

        def learner() -> None:
            time.sleep(0.2)
            api.store.mark_running(job.id)
            for s in range(1, 4):
                api.store.record_step(
                    job.id,
                    {
                        "step": float(s),
                        "policy_version": float(s),
                        "reward_mean": 0.25 * s,
                        "tool_call_rate": 0.5,
                        "all_wrong_tool_rate": 0.1,
                    },
                )
                time.sleep(0.05)
            api.store.finish(job.id, JobState.FAILED, error="out of memory")

        thread = threading.Thread(target=learner)
        thread.start()
        final = client.wait(job.id, progress=True, timeout_s=30)
        thread.join()
    assert final.state == JobState.FAILED
    assert final.error == "out of memory"
    err = capsys.readouterr().err
    assert "failed: out of memory" in err


def test_metrics_and_checkpoints_pages(api):
    with Client(api.url, token=TOKEN) as client:
        job = client.submit(spec(steps=1000))
        api.store.mark_running(job.id)
        for s in range(1, 601):
            api.store.record_step(job.id, {"step": float(s), "policy_version": float(s)})
        api.store.record_checkpoint(job.id, 500, "/c/500")
        with httpx.Client(base_url=api.url, headers=api.headers()) as http:
            page = http.get(f"/v1/jobs/{job.id}/metrics", params={"after_step": 10, "limit": 5})
            body = page.json()
            assert [r["step"] for r in body["records"]] == [11, 12, 13, 14, 15]
            assert body["next_after_step"] == 15
        records = client.metrics(job.id)  # 600 records: two pages of 500
        assert [r["step"] for r in records] == list(range(1, 601))
        assert [c.path for c in client.checkpoints(job.id)] == ["/c/500"]
        with pytest.raises(NotFound):
            client.metrics("no-such-job")


def test_list_filters_and_pages(api):
    with Client(api.url, token=TOKEN) as client:
        ids = [client.submit(spec(name=f"j{i}")).id for i in range(5)]
        client.cancel(ids[0])
        page = client.list(limit=2)
        assert [j.id for j in page.items] == ids[::-1][:2]
        rest = client.list(limit=10, cursor=page.next_cursor)
        assert [j.id for j in rest.items] == ids[::-1][2:]
        assert rest.next_cursor is None
        assert [j.id for j in client.list(state="cancelled").items] == [ids[0]]


def test_body_size_cap_is_a_413(redis_server):
    running, thread = start_api(redis_server, max_body_bytes=2048)
    try:
        with httpx.Client(base_url=running.url, headers=running.headers()) as http:
            big = spec(model="m" * 5000)
            resp = http.post("/v1/jobs", json=big)
            assert resp.status_code == 413
            assert resp.headers["content-type"] == "application/problem+json"
            assert "2048 bytes" in resp.json()["detail"]

            def chunks():  # no Content-Length: the cap counts the bytes as they arrive
                yield b'{"name": "x", "model": "'
                yield b"m" * 5000
                yield b'"}'

            streamed = http.post(
                "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
            )
            assert streamed.status_code == 413
            assert http.post("/v1/jobs", json=spec()).status_code == 201
    finally:
        running.server.should_exit = True
        thread.join(timeout=10)


def test_rate_limit_is_a_429_per_token(redis_server):
    running, thread = start_api(redis_server, rate_limit_per_s=1, rate_limit_burst=3)
    try:
        with httpx.Client(base_url=running.url) as http:
            codes = [http.get("/v1/jobs", headers=running.headers()).status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200]
            assert codes[3:] == [429, 429]
            limited = http.get("/v1/jobs", headers=running.headers())
            assert int(limited.headers["retry-after"]) >= 1
            assert "rate limit" in limited.json()["detail"]
            # Another token has its own bucket.
            assert http.get("/v1/jobs", headers=running.headers(OTHER_TOKEN)).status_code == 200
    finally:
        running.server.should_exit = True
        thread.join(timeout=10)


def test_request_id_is_echoed_or_made_and_tokens_are_never_logged(api, caplog):
    with httpx.Client(base_url=api.url, headers=api.headers()) as http, caplog.at_level("INFO"):
        given = http.get("/v1/jobs", headers={"X-Request-ID": "trace-42"})
        made = http.get("/v1/jobs/nope")
        weird = http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert given.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 32
    assert made.json()["request_id"] == made.headers["x-request-id"]
    assert weird.headers["x-request-id"] != "bad id\twith spaces"
    lines = [r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records]
    assert any("trace-42" in line for line in lines)
    assert not any(TOKEN in line for line in lines)


def test_prometheus_metrics(api):
    with httpx.Client(base_url=api.url, headers=api.headers()) as http:
        http.post("/v1/jobs", json=spec())
        text = http.get("/metrics").text
    assert 'axpo_api_requests_total{method="POST",route="/v1/jobs",status="201"} 1.0' in text
    assert 'axpo_api_jobs{state="queued"} 1.0' in text


def test_async_client(api):
    async def main() -> None:
        async with AsyncClient(api.url, token=TOKEN) as client:
            job = await client.submit(spec(steps=2), idempotency_key="k")
            assert (await client.submit(spec(steps=2), idempotency_key="k")).id == job.id
            api.store.mark_running(job.id)
            for s in (1, 2):
                api.store.record_step(job.id, {"step": float(s), "policy_version": float(s)})
            api.store.finish(job.id, JobState.SUCCEEDED)
            kinds = [e.type async for e in client.events(job.id)]
            assert kinds == ["state", "state", "step", "step", "state"]
            final = await client.wait(job.id, progress=False)
            assert final.state == JobState.SUCCEEDED
            assert len(await client.metrics(job.id)) == 2
            assert [j.id for j in (await client.list()).items] == [job.id]
            with pytest.raises(Conflict):
                await client.cancel(job.id)

    asyncio.run(main())


def test_the_job_cli(api, tmp_path, capsys, monkeypatch):
    import json

    from axpo.cli.main import main

    monkeypatch.setenv("AXPO_API_URL", api.url)
    monkeypatch.setenv("AXPO_API_TOKEN", TOKEN)
    config = tmp_path / "job.yaml"
    config.write_text("name: cli\nmodel: m\nsteps: 2\n")
    assert main(["job", "submit", str(config)]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "queued"
    assert job["name"] == "cli"
    assert main(["job", "status", job["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job["id"]
    assert main(["job", "list", "--state", "queued"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)["items"]] == [job["id"]]
    api.store.mark_running(job["id"])
    for s in (1, 2):
        api.store.record_step(job["id"], {"step": float(s), "policy_version": float(s)})
    api.store.finish(job["id"], JobState.SUCCEEDED)
    assert main(["job", "watch", job["id"], "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "succeeded"
    assert main(["job", "metrics", job["id"], "--json"]) == 0
    assert [r["step"] for r in json.loads(capsys.readouterr().out)] == [1, 2]
    assert main(["job", "cancel", job["id"]]) == 1
    assert "already succeeded" in capsys.readouterr().err
    config.write_text("name: bad name\nmodel: m\n")
    assert main(["job", "submit", str(config)]) == 2
    assert "name:" in capsys.readouterr().err
    assert main(["job", "status", job["id"], "--token", "wrong"]) == 1
    assert "403" in capsys.readouterr().err
