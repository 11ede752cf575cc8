"""Property-based tests of the whole HTTP surface (schemathesis over /openapi.json, against
the real api over HTTP): on every generated input, with and without a token, no 5xx, and
every response conforms to the schema (status documented, content type, body, headers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from axpo.queue.redis_server import RedisServer
from tests.integration.api_fixtures import TOKEN, RunningApi, start_api

pytestmark = pytest.mark.integration

# Small enough that the module runs in well under a minute on 2 cores.
EXAMPLES = 12


@pytest.fixture(scope="module")
def running_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), fsync="everysec")
    server.start()
    # No rate limit in the way: every generated request reaches its route.
    running, thread = start_api(server, rate_limit_per_s=10_000, rate_limit_burst=10_000)
    yield running
    running.server.should_exit = True
    thread.join(timeout=10)
    server.stop()


def _check_every_operation(url: str, headers: dict[str, str], examples: int) -> list[str]:
    """Run each operation's generated cases through every check; returns the operations
    checked. (Driven by hand with hypothesis: schemathesis' pytest plugin does not load under
    this pytest.)"""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            excluded = [positive_data_acceptance] if case.operation.label in LOOSE else []
            response = case.call_and_validate(headers=headers, timeout=10, excluded_checks=excluded)
            if not headers and case.operation.path not in PUBLIC:
                # Schemathesis may still send a made-up bearer token from the security scheme.
                assert response.status_code in (401, 403), case.operation.label

        run()
        checked.append(operation.label)
    return checked


PUBLIC = ("/healthz", "/readyz")
# JobSpec's run.inference / run.tools / run.learner are free-form mappings in the schema that
# a validator checks against each service's settings, so a schema-valid body may still be a
# 422 (a correct answer): "schema-valid data is accepted" cannot hold for this operation.
LOOSE = ("POST /v1/jobs",)


def test_every_operation_with_a_token(running_api):
    checked = _check_every_operation(
        running_api.url, {"Authorization": f"Bearer {TOKEN}"}, EXAMPLES
    )
    assert "POST /v1/jobs" in checked
    assert "GET /v1/jobs/{job_id}/events" in checked
    assert len(checked) == 10, checked


def test_every_operation_without_a_token(running_api):
    checked = _check_every_operation(running_api.url, {}, EXAMPLES // 2)
    assert len(checked) == 10, checked
