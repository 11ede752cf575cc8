"""The job of an ``axpo run``: the run's own api process, the job submitted through the Python
client, and the launcher acting as the deployment's runner for it in the job store.

:func:`start_api` starts ``axpo serve api`` on the run's private Redis with a token made for
this run (``<run_dir>/api-token``, mode 0600; the URL in ``<run_dir>/api-url``), so a person
can ``axpo job watch`` or ``axpo job cancel`` the run from another shell. :func:`submit_and_claim`
submits the job spec through ``axpo_client.Client`` and claims it from the store
(``claim_next``, ``mark_running``). :class:`RunJob` then records what the launcher sees (each
step record of ``metrics.jsonl``, each checkpoint, each weight version the inference service
serves, each restart), answers whether a cancel was asked for, and ends the job
(``finish``), reading its final state back through the client.

``axpo_client`` and ``httpx`` are imported here only, when a run starts: the core does not
depend on the client at import time.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from axpo.jobs import JobState, JobStateError, JobStore
from axpo.jobs.progress import JobProgress
from axpo.local.processes import Child, Processes, Restart, RunError
from axpo.settings.job import JobSpec

if TYPE_CHECKING:
    from axpo_client import Client

_REPORTED_ERROR_CHARS = 4000
"""A failed job's error in the store: the run's message, cut (log tails can be long)."""


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600, also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text + "\n")


def start_api(
    procs: Processes, redis_url: str, run_dir: Path, timeout_s: float, token: str = ""
) -> tuple[Child, str, str]:
    """``axpo serve api`` on ``redis_url`` with ``token`` (``AXPO_API_TOKENS``: one token or
    several, comma-separated), or a random one written to ``run_dir/api-token`` (0600); waits
    until ``/readyz`` answers 200. Returns ``(child, url, token)`` and writes ``api-url`` in
    ``run_dir``."""
    import httpx

    if not token:
        token = secrets.token_urlsafe(32)
        _write_private(run_dir / "api-token", token)
    env = {"AXPO_API_REDIS_URL": redis_url, "AXPO_API_TOKENS": token}
    api = procs.start("api", "api", env)
    deadline = time.monotonic() + timeout_s
    port = procs.wait_port(api, deadline, timeout_s)
    url = f"http://127.0.0.1:{port}"
    last = "no answer"
    while True:
        procs.check_children()
        try:
            resp = httpx.get(f"{url}/readyz", timeout=1.0)
            if resp.status_code == 200:
                break
            last = f"{resp.status_code} {resp.text[:200]}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise RunError(
                f"the api at {url} was not ready within {timeout_s:.0f} s (last: {last}); last "
                f"lines of {api.log_path}:\n{api.log_tail()}"
            )
        time.sleep(0.1)
    (run_dir / "api-url").write_text(url + "\n")
    return api, url, token


def submit_and_claim(client: Client, store: JobStore, spec: JobSpec, run_dir: Path) -> str:
    """Submit ``spec`` through the api (idempotency key: the run folder, so a retried submit
    makes no second job) and claim it as this deployment's runner; returns the job id.

    The run's Redis persists in the run folder, so a run started again in the same folder finds
    its earlier jobs: a job the earlier attempt left running is resumed (the same key names
    it); one that finished, or a key reused with an edited spec, gets a new job. Any other job
    holding the deployment's running slot was left by an earlier attempt: it is failed as
    superseded, so that the store's one running job is this run's."""
    from axpo_client import Conflict

    body = spec.model_dump(mode="json")
    key = f"axpo run {run_dir}"
    try:
        job = client.submit(body, idempotency_key=key)
    except Conflict:  # the same folder run before with another spec
        job = None
    if job is None or job.state.finished:
        job = client.submit(body, idempotency_key=f"{key} {time.time_ns()}")
    while (claimed := store.claim_next()) is not None and claimed.id != job.id:
        store.finish(
            claimed.id,
            JobState.FAILED,
            f"superseded by job {job.id}: an earlier axpo run in {run_dir} ended without "
            "finishing it",
        )
    if claimed is None:
        raise RunError(f"job {job.id} was submitted but the job store did not hand it out")
    store.mark_running(job.id)
    return job.id


@dataclass
class RunJob:
    """This run's job in the store (``store``) and through the api (``client``)."""

    store: JobStore
    client: Client
    job_id: str
    api_url: str
    checkpoint_dir: Path
    served_version: Callable[[], int | None] = lambda: None
    """The weight version the inference service serves now (None when it cannot tell)."""
    say: Callable[[str], None] = print
    state: str | None = None
    """The final state read back through the client, once :meth:`finish` ran."""
    finished: bool = False
    _progress: JobProgress = field(init=False)

    def __post_init__(self) -> None:
        self._progress = JobProgress(
            self.store, self.job_id, self.checkpoint_dir, lambda: self.served_version()
        )

    def record(self, record: dict[str, Any]) -> None:
        """One new step record of ``metrics.jsonl``, with the checkpoints and weight version
        that came with it (:class:`~axpo.jobs.progress.JobProgress`)."""
        self._progress.record(record)

    def on_restart(self, event: Restart) -> None:
        self.store.record_restart(self.job_id, event.service, event.reason(), event.number)

    def cancel_requested(self) -> bool:
        """Whether the job was cancelled through the api (``axpo job cancel``, Ctrl-C)."""
        return self.store.cancel_requested(self.job_id)

    def cancel(self) -> None:
        """Cancel through the api, as any client would (what Ctrl-C does)."""
        from axpo_client import ApiError, Conflict

        try:
            self.client.cancel(self.job_id)
        except Conflict:
            pass  # finished meanwhile
        except ApiError as exc:
            self.say(f"warning: cancelling job {self.job_id} through the api failed: {exc}")

    def finish(self, state: JobState, error: str | None = None) -> str | None:
        """End the job as ``state`` (unless it already ended: a queued job cancelled through
        the api ends at once) and read its final state back through the client. A store or
        api that cannot be reached is reported, not raised: the run's own outcome stands."""
        import redis

        from axpo_client import ApiError

        if self.finished:
            return self.state
        self.finished = True
        if error is not None and len(error) > _REPORTED_ERROR_CHARS:
            error = error[:_REPORTED_ERROR_CHARS] + " ... (the rest is in the run's logs)"
        try:
            if not self.store.get(self.job_id).state.finished:
                self.store.finish(self.job_id, state, error)
            self.state = str(self.client.get(self.job_id).state)
        except (redis.RedisError, JobStateError, ApiError) as exc:
            self.say(f"warning: could not record job {self.job_id} as {state}: {exc}")
        return self.state
