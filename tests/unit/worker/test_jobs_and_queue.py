from __future__ import annotations

import pytest
import redis

from msam_service import jobs
from msam_service.contract import JobRequest
from msam_service.jobs import JobStore
from msam_service.queue import celery_config
from msam_service.settings import Settings


def test_transitions_are_compare_and_set(r) -> None:
    store = JobStore(r, ttl_s=60)
    store.create("a" * 32, tenant="t", volume_id="v", request=JobRequest(prompts={}))
    store.create("b" * 32, tenant="t", volume_id="v", request=JobRequest())
    assert store.queue_position("a" * 32) == 1 and store.queue_position("b" * 32) == 2
    assert store.transition("a" * 32, jobs.RUNNING, (jobs.QUEUED,)) == jobs.QUEUED
    assert store.queue_position("a" * 32) is None and store.queue_position("b" * 32) == 1
    assert store.counts() == {"queued": 1, "running": 1}
    # a cancel wins over a finishing worker: the later "succeeded" is refused
    assert store.transition("a" * 32, jobs.CANCELED, (jobs.QUEUED, jobs.RUNNING)) == jobs.RUNNING
    assert store.transition("a" * 32, jobs.SUCCEEDED, (jobs.RUNNING,)) is None
    rec = store.get("a" * 32)
    assert rec is not None and rec.status == jobs.CANCELED and rec.tenant == "t"
    assert store.transition("missing", jobs.RUNNING, (jobs.QUEUED,)) is None
    store.update("b" * 32, timings={"load": 0.5}, error={"code": "x", "message": "y"})
    assert store.get("b" * 32).timings == {"load": 0.5}
    assert 0 < r.ttl(jobs.job_key("b" * 32)) <= 60
    store.delete("b" * 32)
    assert store.get("b" * 32) is None and store.counts() == {"queued": 0, "running": 0}


def test_celery_reliability_settings() -> None:
    s = Settings(redis_url="unix:///tmp/r.sock?db=2", job_time_limit_s=100, job_soft_time_limit_s=90,
                 visibility_timeout_s=150)
    conf = celery_config(s)
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_time_limit"] == 100 and conf["task_soft_time_limit"] == 90
    # every place Celery reads the visibility timeout, all above the hard limit
    assert conf["broker_transport_options"]["visibility_timeout"] == 150
    assert conf["result_backend_transport_options"]["visibility_timeout"] == 150
    assert conf["visibility_timeout"] == 150
    assert conf["broker_url"] == "redis+socket:///tmp/r.sock?virtual_host=2"


def test_settings_refuse_a_visibility_timeout_below_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="VISIBILITY"):
        Settings(job_time_limit_s=600, visibility_timeout_s=300).check()
    with pytest.raises(ValueError, match="SOFT"):
        Settings(job_time_limit_s=100, job_soft_time_limit_s=100, visibility_timeout_s=300).check()
    monkeypatch.setenv("REDIS_URL", "redis://h:1/0")
    monkeypatch.setenv("MSAM_PORT", "9001")
    s = Settings()
    assert s.redis_url == "redis://h:1/0" and s.port == 9001
    monkeypatch.setenv("MSAM_REDIS_URL", "redis://other:2/0")
    assert Settings().redis_url == "redis://other:2/0"


def test_liveness_records_readiness_and_the_container_healthcheck_read_the_same_keys(
        r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers beat under queue.worker_key; /readyz and /info (queue.live_workers) and the
    container health check (worker.healthcheck) find them there, and only beating ones."""
    import socket

    from msam_service import queue
    from msam_service.settings import get_settings
    from worker import healthcheck

    monkeypatch.setenv("MSAM_REDIS_URL", redis_url)
    get_settings.cache_clear()
    try:
        assert queue.live_workers(r) == [] and healthcheck.main() == 1
        r.hset(queue.worker_key(f"{socket.gethostname()}:4242"), mapping={"starting": "1"})  # not beating yet
        assert queue.live_workers(r) == []
        r.hset(queue.worker_key(f"{socket.gethostname()}:4242"), mapping={"alive_at": "1.0", "device": "cpu"})
        assert queue.live_workers(r) == [{"starting": "1", "alive_at": "1.0", "device": "cpu"}]
        assert healthcheck.main() == 0
        r.delete(queue.worker_key(f"{socket.gethostname()}:4242"))
        r.hset(queue.worker_key("elsewhere:1"), mapping={"alive_at": "1.0"})  # another host's worker
        assert len(queue.live_workers(r)) == 1 and healthcheck.main() == 1
    finally:
        get_settings.cache_clear()


def test_a_model_report_leaves_no_liveness_record_that_never_expires(r: redis.Redis, tmp_path) -> None:
    """The worker reports whether its model loaded on its liveness record. Written by a pool child
    whose main process has gone (the record expired), it gets the heartbeat's expiry instead of
    living for ever; a beating record keeps the expiry its heartbeat gave it."""
    from msam_core.errors import InvalidCheckpoint
    from msam_service.jobs import JobStore
    from msam_service.metrics import RedisMetrics
    from msam_service.queue import WORKER_TTL_S, worker_key
    from msam_service.settings import Settings
    from msam_service.storage import make_storage
    from worker.embedding_cache import RedisEmbeddingCache
    from worker.runtime import Runtime, worker_name

    rt = Runtime(settings=Settings(storage_dir=tmp_path, checkpoint=tmp_path / "gone.safetensors"), redis=r,
                 store=JobStore(r, 60), metrics=RedisMetrics(r), storage=make_storage(tmp_path),
                 cache=RedisEmbeddingCache(r, 60, 2**20))
    key = worker_key(worker_name())
    r.delete(key)
    with pytest.raises(InvalidCheckpoint):
        rt.model()
    assert r.hget(key, "model_loaded") == b"0" and 0 < r.ttl(key) <= WORKER_TTL_S
    r.expire(key, 7)  # as a beat left it, a little later
    with pytest.raises(InvalidCheckpoint):
        rt.model()
    assert 0 < r.ttl(key) <= 7
