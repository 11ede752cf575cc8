"""The api's FastAPI application: :func:`create_app` (routes, auth, limits, errors, metrics).

Stateless: every answer comes from the job store in Redis (:mod:`axpo.jobs`), so replicas
behind a load balancer agree and a restart loses nothing. Plain ``def`` routes run the
synchronous store in the thread pool; the event stream is async (one ``XREAD BLOCK`` per
watcher on an asyncio Redis client) so watchers do not hold threads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import WithJsonSchema

from axpo import __version__
from axpo.jobs import JobEvent, JobRecord, JobStore
from axpo.jobs import JobState as StoreState
from axpo.settings.api import ApiSettings
from axpo.settings.job import JobSpec
from axpo_api.auth import Auth, TokenBuckets
from axpo_api.middleware import RequestContext
from axpo_api.problems import ApiProblem, documented, install
from axpo_client.models import (
    Checkpoint,
    CheckpointList,
    Health,
    Job,
    JobList,
    JobState,
    MetricsPage,
)

JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
EVENT_ID = r"^\d{1,20}-\d{1,20}$"
METRICS_PAGE = 500

JobId = Annotated[str, Path(pattern=JOB_ID, description="A job id.")]


def _time(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def job_model(job: JobRecord) -> Job:
    return Job(
        id=job.id,
        name=job.name,
        state=JobState(job.state.value),
        spec=job.spec,
        steps=job.steps,
        step=job.step,
        policy_version=job.policy_version,
        last_step=job.last_step,
        error=job.error,
        cancel_requested=job.cancel_requested,
        created_at=datetime.fromtimestamp(job.created_at, UTC),
        started_at=_time(job.started_at),
        ended_at=_time(job.ended_at),
    )


def sse_frame(event: JobEvent) -> bytes:
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


def create_app(settings: ApiSettings, client: redis.Redis | None = None) -> FastAPI:
    """The application. ``client`` (bytes replies) defaults to one for ``settings.redis_url``.
    Raises ValueError when no token is configured."""
    auth = Auth(
        settings.all_tokens(), TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
    )
    sync = client if client is not None else redis.Redis.from_url(settings.redis_url)
    store = JobStore(sync, settings.key_prefix, settings.idempotency_ttl_s)
    async_client: aioredis.Redis = aioredis.Redis(**_async_kwargs(sync))

    registry = CollectorRegistry()
    requests = Counter(
        "axpo_api_requests", "Requests answered.", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "axpo_api_request_seconds",
        "Time to answer (SSE: the stream's life).",
        ["route"],
        registry=registry,
    )
    jobs_gauge = Gauge("axpo_api_jobs", "Jobs by state.", ["state"], registry=registry)

    def on_done(method: str, route: str, status: int, seconds: float) -> None:
        requests.labels(method, route, str(status)).inc()
        latency.labels(route).observe(seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await async_client.aclose()

    app = FastAPI(
        title="axpo api",
        version=__version__,
        description="Training jobs of an axpo deployment: submit, watch, cancel.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.settings = settings
    install(app)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, on_done=on_done)
    authed = [Depends(auth)]
    common = documented(401, 403, 413, 429, 503)

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """The process is up (no dependency checked)."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["health"],
        responses={503: {"model": Health, "description": "Redis unreachable"}},
    )
    def readyz() -> Any:
        """Ready to serve: Redis answers a ping."""
        try:
            ok = bool(sync.ping())
        except redis.RedisError:
            ok = False
        body = Health(status="ok" if ok else "unavailable", redis=ok)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)

    @app.get(
        "/metrics",
        dependencies=authed,
        tags=["health"],
        responses=common,
        response_class=Response,
    )
    def metrics() -> Response:
        """Prometheus metrics: requests, latency, jobs by state."""
        for state in StoreState:
            jobs_gauge.labels(state.value).set(sync.zcard(f"{store.prefix}:state:{state.value}"))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/jobs",
        response_model=Job,
        status_code=201,
        dependencies=authed,
        tags=["jobs"],
        responses={
            200: {
                "model": Job,
                "description": "The job an earlier call with this Idempotency-Key made",
            },
            **common,
            **documented(409, 422),
        },
    )
    def submit(
        request: Request,
        response: Response,
        spec: Annotated[JobSpec, Body(description="A job spec, as in configs/*.yaml.")],
        idempotency_key: Annotated[
            str | None,
            WithJsonSchema({"type": "string", "maxLength": 255}),
            Header(
                max_length=255,
                description="Makes a retried submit return the same job instead of a second one.",
            ),
        ] = None,
    ) -> Job:
        """Queue a training job."""
        job, created = store.submit(
            spec, idempotency_key=idempotency_key, scope=getattr(request.state, "token", "")
        )
        if not created:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job_model(job)

    @app.get(
        "/v1/jobs",
        response_model=JobList,
        dependencies=authed,
        tags=["jobs"],
        responses={**common, **documented(422)},
    )
    def list_jobs(
        state: Annotated[
            JobState | None, WithJsonSchema({"$ref": "#/components/schemas/JobState"})
        ] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[
            int | None,
            WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 2**53}),
            Query(ge=0, le=2**53, description="`next_cursor` of the previous page."),
        ] = None,
    ) -> JobList:
        """Jobs, newest first, optionally in one state."""
        jobs, next_cursor = store.list(
            StoreState(state.value) if state else None, limit=limit, cursor=cursor
        )
        return JobList(items=[job_model(j) for j in jobs], next_cursor=next_cursor)

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=Job,
        dependencies=authed,
        tags=["jobs"],
        responses={**common, **documented(404, 422)},
    )
    def get_job(job_id: JobId) -> Job:
        """A job: state, step, policy version, last step record, error, times."""
        return job_model(store.get(job_id))

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        response_model=Job,
        dependencies=authed,
        tags=["jobs"],
        responses={**common, **documented(404, 409, 422)},
    )
    def cancel(job_id: JobId) -> Job:
        """Cancel a job: a queued one at once; a running one stops after its learner
        checkpoints (``cancel_requested`` is set, the state becomes ``cancelled`` then).
        A finished job: 409."""
        return job_model(store.cancel(job_id))

    @app.get(
        "/v1/jobs/{job_id}/metrics",
        response_model=MetricsPage,
        dependencies=authed,
        tags=["jobs"],
        responses={**common, **documented(404, 422)},
    )
    def job_metrics(
        job_id: JobId,
        after_step: Annotated[int, Query(ge=-1, le=2**53)] = -1,
        limit: Annotated[int, Query(ge=1, le=METRICS_PAGE)] = METRICS_PAGE,
    ) -> MetricsPage:
        """Step records (as in metrics.jsonl) with ``step > after_step``, in step order."""
        store.get(job_id)
        records = store.metrics(job_id, after_step=after_step, limit=limit)
        full = len(records) == limit
        return MetricsPage(
            job_id=job_id,
            records=records,
            next_after_step=int(records[-1]["step"]) if full else None,
        )

    @app.get(
        "/v1/jobs/{job_id}/checkpoints",
        response_model=CheckpointList,
        dependencies=authed,
        tags=["jobs"],
        responses={**common, **documented(404, 422)},
    )
    def checkpoints(job_id: JobId) -> CheckpointList:
        """Checkpoints the learner wrote, oldest first."""
        store.get(job_id)
        items = [
            Checkpoint(step=c["step"], path=c["path"], time=datetime.fromtimestamp(c["time"], UTC))
            for c in store.checkpoints(job_id)
        ]
        return CheckpointList(items=items)

    @app.get(
        "/v1/jobs/{job_id}/events",
        dependencies=authed,
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-sent events: `id` (resume after it with Last-Event-ID), "
                "`event` (state, step, checkpoint, publish, restart, cancel_requested), `data` "
                "(JSON). The stream ends after the job's final state event.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            204: {"description": "The job has finished and no event follows Last-Event-ID."},
            **common,
            **documented(404, 422),
        },
    )
    async def events(
        job_id: JobId,
        last_event_id: Annotated[
            str | None,
            WithJsonSchema({"type": "string", "pattern": EVENT_ID}),
            Header(
                alias="Last-Event-ID",
                pattern=EVENT_ID,
                description="Resume after this event id (`ms-seq`, a previous event's `id`).",
            ),
        ] = None,
    ) -> Response:
        """The job's events, from the first (or after Last-Event-ID), live."""
        raw: Any = await async_client.hget(store.job_key(job_id), "state")
        if raw is None:
            raise ApiProblem(404, f"no job {job_id!r}")
        after = last_event_id or "0"
        key = store.events_key(job_id)
        if StoreState(raw.decode()).finished:
            pending = await async_client.xrange(key, f"({after}", "+", count=1)
            if not pending:
                return Response(status_code=204)
        ping_ms = int(settings.sse_ping_s * 1000)

        async def stream() -> AsyncIterator[bytes]:
            last = after
            while True:
                reply: Any = await async_client.xread({key: last}, count=100, block=ping_ms)
                if not reply:
                    yield b": ping\n\n"
                    continue
                for entry_id, fields in reply[0][1]:
                    event = JobEvent.from_entry(entry_id, fields)
                    last = event.id
                    yield sse_frame(event)
                    if event.type == "state" and StoreState(event.data["state"]).finished:
                        return

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return app


def _async_kwargs(client: redis.Redis) -> dict[str, Any]:
    """Connection arguments of ``client``'s pool, for an asyncio client to the same server."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    # No socket_timeout: an XREAD BLOCK waits up to sse_ping_s by design.
    keep = ("host", "port", "db", "username", "password", "path", "socket_connect_timeout")
    out = {k: kwargs[k] for k in keep if k in kwargs}
    if "path" in out:
        out["unix_socket_path"] = out.pop("path")
    return out
