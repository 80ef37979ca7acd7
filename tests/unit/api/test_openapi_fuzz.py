"""schemathesis against the gateway's own OpenAPI document: whatever a generated request holds,
the answer is never a 5xx (and every 4xx has the error shape). In-process (ASGI) on a private
Redis, no worker; a bounded number of examples per operation keeps it well under a minute."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from api.main import build_services, create_app
from msam_service.settings import Settings
from tests.unit.worker.conftest import redis_url  # noqa: F401 - the private Redis fixture

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def app(redis_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    s = Settings(redis_url=redis_url, storage_dir=tmp_path_factory.mktemp("fuzz") / "storage",
                 max_upload_mb=4, request_timeout_s=20)
    application = create_app(s)
    application.state.services = build_services(s)  # what the lifespan does (schemathesis calls without it)
    # a worker's heartbeat, so /readyz is 200 (its documented 503 needs a dead worker)
    application.state.services.redis.hset("msam:worker:fuzz:1", mapping={"alive_at": str(time.time())})
    return application


def test_no_server_errors(app) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
            ctype = " ".join(response.headers.get("content-type", []))
            if response.status_code >= 400 and ctype.startswith("application/json"):
                body = response.json()
                assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"], body

        check()
