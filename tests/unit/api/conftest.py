from tests.unit.worker.conftest import r, redis_url  # noqa: F401 - shared fixtures: a private Redis
