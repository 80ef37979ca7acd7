"""The Segmenter's :class:`~msam_core.pipeline.segmenter.EmbeddingCache`, backed by Redis.

- Key: ``msam:emb:<namespace>/<model id>:<sha256 of the preprocessed crop>`` (after the
  namespace, the key the Segmenter makes), so different weights never share entries and the same
  crop from any worker hits.
- Namespace: one per tenant (:func:`tenant_namespace`, a digest of the tenant's name), so a
  tenant's ``cache_hits`` and timings never reveal that another tenant segmented the same scan at
  the same place. ``MSAM_SHARED_EMBEDDING_CACHE=true`` gives all tenants one cache, without
  namespace (a deliberate choice for a single organisation; off by default).
- Value: a small header (magic, dtype, shape) + the zlib-compressed bytes of the embedding in
  its own dtype: **lossless**, so a follow-up click decodes from exactly the embedding the first
  one did, and a job's mask equals ``msam segment``'s and ``msam evaluate``'s (a float16 copy
  moved a few voxels near the threshold).
- Lifetime: ``ttl_s`` since the last use (a hit extends it).
- Memory cap: the cache keeps its own byte count and evicts least recently used entries past
  ``max_bytes``, in one Lua script. Redis itself runs ``noeviction`` (it holds the queue, which
  must never be evicted), so the cache must bound itself.
- Hits and misses are counted in this process (``hits``/``misses``, which the Segmenter reads)
  and in Redis for ``/metrics``.
"""

from __future__ import annotations

import hashlib
import struct
import time
import zlib

import numpy as np
import redis
import torch

from msam_service.metrics import RedisMetrics

PREFIX = "msam:emb:"
INDEX = "msam:emb:index"
SIZES = "msam:emb:sizes"
BYTES = "msam:emb:bytes"
_MAGIC = b"MSE2"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPES_BACK = {v: k for k, v in _DTYPES.items()}

# KEYS: entry, index, sizes, bytes. ARGV: value, ttl, now, max_bytes, entry name.
_PUT = """
local ttl = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[5]) or '0')
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('HSET', KEYS[3], ARGV[5], string.len(ARGV[1]))
local total = redis.call('INCRBY', KEYS[4], string.len(ARGV[1]) - old)
-- forget entries that expired by TTL (score = last use)
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)) do
  local size = tonumber(redis.call('HGET', KEYS[3], name) or '0')
  redis.call('DEL', 'msam:emb:' .. name)
  redis.call('HDEL', KEYS[3], name)
  redis.call('ZREM', KEYS[2], name)
  total = redis.call('DECRBY', KEYS[4], size)
end
-- least recently used first, until under the cap (never the entry just written)
local evicted = 0
while total > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if (not oldest) or oldest == ARGV[5] then break end
  local size = tonumber(redis.call('HGET', KEYS[3], oldest) or '0')
  redis.call('DEL', 'msam:emb:' .. oldest)
  redis.call('HDEL', KEYS[3], oldest)
  redis.call('ZREM', KEYS[2], oldest)
  total = redis.call('DECRBY', KEYS[4], size)
  evicted = evicted + 1
end
return evicted
"""


def pack(embedding: torch.Tensor) -> bytes:
    """The embedding, bit for bit: header + zlib of its bytes (bfloat16 travels as its 16 bits)."""
    t = embedding.detach().to("cpu").contiguous()
    if t.dtype not in _DTYPES:
        t = t.float()
    raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    header = _MAGIC + struct.pack("<BB", _DTYPES[t.dtype], t.ndim) + struct.pack(f"<{t.ndim}I", *t.shape)
    return header + zlib.compress(raw.tobytes(), 1)


def unpack(data: bytes) -> torch.Tensor:
    """:func:`pack`'s bytes -> the tensor; ``ValueError`` for anything else (an entry of another
    msam version is a miss, not a wrong embedding)."""
    if data[:4] != _MAGIC:
        raise ValueError("not an msam embedding of this version")
    dtype_code, ndim = struct.unpack_from("<BB", data, 4)
    shape = struct.unpack_from(f"<{ndim}I", data, 6)
    dtype = _DTYPES_BACK[dtype_code]
    body = zlib.decompress(data[6 + 4 * ndim:])
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(body, dtype=np.int16).reshape(shape).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(body, dtype=torch.empty(0, dtype=dtype).numpy().dtype).reshape(shape).copy())


def tenant_namespace(tenant: str) -> str:
    """The cache namespace of ``tenant``: a digest, so keys have one shape whatever the name."""
    return "t" + hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:24]


class RedisEmbeddingCache:
    """Embeddings in Redis under ``namespace`` (``""``: no namespace, the shared cache). The
    memory cap and the LRU order are global: every namespace counts against one ``max_bytes``."""

    def __init__(self, r: redis.Redis, ttl_s: int, max_bytes: int, metrics: RedisMetrics | None = None,
                 namespace: str = "") -> None:
        if "/" in namespace or ":" in namespace:
            raise ValueError("a cache namespace holds no '/' or ':'")
        self.r = r
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.namespace = namespace
        self.hits = 0
        self.misses = 0
        self._put = r.register_script(_PUT)

    def scoped(self, namespace: str) -> RedisEmbeddingCache:
        """The same cache (Redis, lifetime, cap, metrics) under ``namespace``, with its own
        hit and miss counts: one per job."""
        return RedisEmbeddingCache(self.r, self.ttl_s, self.max_bytes, self.metrics, namespace)

    def _name(self, key: str) -> str:
        """The entry's name in the LRU index; its Redis key is ``PREFIX + name``."""
        return f"{self.namespace}/{key}" if self.namespace else key

    def get(self, key: str) -> torch.Tensor | None:
        name = self._name(key)
        try:
            data = self.r.get(PREFIX + name)
        except redis.RedisError:
            data = None  # a cache outage costs speed, not the job
        if data is None:
            self.misses += 1
            self._count("cache_misses")
            return None
        try:
            pipe = self.r.pipeline()
            pipe.expire(PREFIX + name, self.ttl_s)
            pipe.zadd(INDEX, {name: time.time()})
            pipe.execute()
        except redis.RedisError:
            pass
        try:
            embedding = unpack(data)  # type: ignore[arg-type]
        except (ValueError, KeyError, zlib.error, struct.error):
            self.misses += 1  # an entry another msam version wrote: encode again (and overwrite it)
            self._count("cache_misses")
            return None
        self.hits += 1
        self._count("cache_hits")
        return embedding

    def put(self, key: str, embedding: torch.Tensor) -> None:
        value = pack(embedding)
        if len(value) > self.max_bytes:
            return
        name = self._name(key)
        try:
            self._put(keys=[PREFIX + name, INDEX, SIZES, BYTES],
                      args=[value, self.ttl_s, time.time(), self.max_bytes, name])
        except redis.RedisError:
            pass

    def stored_bytes(self) -> int:
        return int(self.r.get(BYTES) or 0)  # type: ignore[arg-type]

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            try:
                self.metrics.incr(name)
            except redis.RedisError:
                pass
