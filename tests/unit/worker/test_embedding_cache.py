from __future__ import annotations

import contextlib

import time

import numpy as np
import pytest
import torch

from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.segmenter import Segmenter
from msam_service.metrics import RedisMetrics
from worker.embedding_cache import BYTES, INDEX, PREFIX, RedisEmbeddingCache, pack, tenant_namespace, unpack


def _emb(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 96, 8, 8, 8, generator=g).to(dtype)


def test_pack_is_lossless_and_compressed() -> None:
    """A cached embedding is the embedding, bit for bit: a follow-up click decodes exactly as the
    first (and as msam segment, which has no Redis cache)."""
    e = _emb()
    data = pack(e)
    assert len(data) < e.numel() * 4 + 64  # zlib over float32, plus a small header
    back = unpack(data)
    assert back.dtype == torch.float32 and back.shape == e.shape and torch.equal(back, e)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        t = e.to(dtype)
        assert torch.equal(unpack(pack(t)), t) and unpack(pack(t)).dtype == dtype
    with pytest.raises(ValueError):
        unpack(b"garbage")


def test_an_entry_of_another_format_is_a_miss(r) -> None:
    cache = RedisEmbeddingCache(r, 60, 2**24)
    r.set(PREFIX + "m:old", b"MSE1" + b"\x00" * 40)  # what the float16 cache of an older msam wrote
    assert cache.get("m:old") is None and cache.misses == 1 and cache.hits == 0


def test_get_put_counts_hits_and_misses(r) -> None:
    metrics = RedisMetrics(r)
    cache = RedisEmbeddingCache(r, ttl_s=60, max_bytes=10 * 2**20, metrics=metrics)
    assert cache.get("m:abc") is None
    cache.put("m:abc", _emb())
    got = cache.get("m:abc")
    assert got is not None and got.shape == (1, 96, 8, 8, 8)
    assert (cache.hits, cache.misses) == (1, 1)
    assert metrics.counters() == {"cache_hits": 1, "cache_misses": 1}
    assert 0 < r.ttl(PREFIX + "m:abc") <= 60
    assert int(r.get(BYTES)) == len(r.get(PREFIX + "m:abc"))


def test_memory_cap_evicts_least_recently_used(r) -> None:
    one = len(pack(_emb()))
    cache = RedisEmbeddingCache(r, ttl_s=60, max_bytes=int(one * 2.5))
    cache.put("m:a", _emb(1))
    time.sleep(0.01)
    cache.put("m:b", _emb(2))
    time.sleep(0.01)
    assert cache.get("m:a") is not None  # a is now more recent than b
    time.sleep(0.01)
    cache.put("m:c", _emb(3))  # over the cap: b goes
    assert cache.get("m:b") is None
    assert cache.get("m:a") is not None and cache.get("m:c") is not None
    assert int(r.get(BYTES)) <= cache.max_bytes
    assert r.zcard(INDEX) == 2


def test_expired_entries_leave_the_byte_count(r) -> None:
    cache = RedisEmbeddingCache(r, ttl_s=1, max_bytes=10 * 2**20)
    cache.put("m:old", _emb(1))
    time.sleep(1.2)
    cache.put("m:new", _emb(2))
    assert r.zcard(INDEX) == 1 and int(r.get(BYTES)) == len(r.get(PREFIX + "m:new"))


def test_redis_outage_costs_speed_not_the_job(redis_url: str) -> None:
    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    broken = redis_lib.Redis(unix_socket_path="/nonexistent/redis.sock", retry=Retry(NoBackoff(), 0))
    cache = RedisEmbeddingCache(broken, ttl_s=60, max_bytes=2**20)
    assert cache.get("m:x") is None
    cache.put("m:x", _emb())  # no exception


class _CountingModel:
    img_size = 128
    model_id = "stub-1"

    def __init__(self) -> None:
        self.encodes = 0

    def autocast(self):
        return contextlib.nullcontext()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.encodes += 1
        return image.mean() * torch.ones(1, 8, 8, 8, 8)

    def decode(self, embedding, points, labels, mask_logits=None, cache=None):  # pragma: no cover - unused
        raise NotImplementedError

    refine = decode


def test_segmenter_uses_the_redis_cache_across_processes_worth_of_instances(r) -> None:
    model = _CountingModel()
    crop = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 128, 128, 128)).astype(np.float32))
    first = Segmenter(model, PipelineOptions(), cache=RedisEmbeddingCache(r, 60, 2**24))
    emb1, key1 = first.encode(crop)
    second = Segmenter(model, PipelineOptions(), cache=RedisEmbeddingCache(r, 60, 2**24))  # another worker, same Redis
    emb2, key2 = second.encode(crop)
    assert key1 == key2 and key1.startswith("stub-1:")
    assert model.encodes == 1 and second.cache.hits == 1
    torch.testing.assert_close(emb1, emb2, atol=1e-2, rtol=1e-3)


def test_namespaces_never_share_entries_but_share_the_cap(r) -> None:
    """One namespace per tenant: the same crop cached by tenant A is a miss for tenant B (whose
    hits would otherwise tell B that A segmented the same scan at the same place)."""
    shared = RedisEmbeddingCache(r, ttl_s=60, max_bytes=int(len(pack(_emb())) * 2.5))
    alpha, beta = shared.scoped(tenant_namespace("alpha")), shared.scoped(tenant_namespace("beta"))
    alpha.put("m:same", _emb(1))
    assert beta.get("m:same") is None and (beta.hits, beta.misses) == (0, 1)
    assert shared.get("m:same") is None  # nor the shared (un-namespaced) cache
    got = alpha.get("m:same")
    assert got is not None and torch.equal(got, _emb(1)) and alpha.hits == 1
    assert all(name.decode().startswith(tenant_namespace("alpha") + "/") for name in r.zrange(INDEX, 0, -1))
    time.sleep(0.01)
    beta.put("m:b", _emb(2))
    time.sleep(0.01)
    beta.put("m:c", _emb(3))  # over the one cap: alpha's entry, the least recently used, goes
    assert alpha.get("m:same") is None and r.zcard(INDEX) == 2
    assert int(r.get(BYTES)) <= shared.max_bytes
    assert tenant_namespace("alpha") != tenant_namespace("beta") and "alpha" not in tenant_namespace("alpha")


def test_runtime_gives_each_tenant_its_namespace_unless_shared(r, tmp_path) -> None:
    from msam_service.jobs import JobStore
    from msam_service.settings import Settings
    from msam_service.storage import make_storage
    from worker.runtime import Runtime

    def runtime(**settings: object) -> Runtime:
        s = Settings(storage_dir=tmp_path, **settings)
        return Runtime(settings=s, redis=r, store=JobStore(r, 60), metrics=RedisMetrics(r),
                       storage=make_storage(tmp_path), cache=RedisEmbeddingCache(r, 60, 2**24))

    assert Settings().shared_embedding_cache is False  # per-tenant unless deliberately shared
    rt = runtime()
    rt.cache_for("alpha").put("m:x", _emb())
    assert rt.cache_for("beta").get("m:x") is None and rt.cache_for("alpha").get("m:x") is not None
    shared = runtime(shared_embedding_cache=True)
    shared.cache_for("alpha").put("m:y", _emb())
    assert shared.cache_for("beta").get("m:y") is not None
    assert r.get(PREFIX + "m:y") is not None  # the shared cache keeps the un-namespaced key
