"""What a worker process keeps between jobs: the model (loaded once, lazily, in the child that
runs jobs), the Redis clients, the embedding cache and a few decoded volumes."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from msam_core.errors import InvalidCheckpoint
from msam_core.io.volume import Volume
from msam_service import redis_conn
from msam_service.jobs import JobStore
from msam_service.queue import WORKER_TTL_S, worker_key
from msam_service.metrics import RedisMetrics
from msam_service.settings import Settings, get_settings
from msam_service.storage import Storage, make_storage
from msam_service.volumes import VolumeInfo, open_volume
from worker.embedding_cache import RedisEmbeddingCache, tenant_namespace

if TYPE_CHECKING:
    from msam_core.checkpoints import LoadedModel

logger = logging.getLogger(__name__)


def worker_name() -> str:
    """``host:pid`` of the worker's main process (pool children inherit the variable)."""
    return f"{socket.gethostname()}:{os.environ.get('MSAM_WORKER_MAIN_PID', os.getpid())}"


def checkpoint_problem(settings: Settings) -> str | None:
    """Why the model cannot be loaded, judged without loading it (``None``: looks fine)."""
    path = settings.checkpoint_path()
    if not path.is_file():
        where = "MSAM_CHECKPOINT" if settings.checkpoint else "the bundled default; MSAM_CHECKPOINT is unset"
        return (f"no model: {path} does not exist ({where}); set MSAM_CHECKPOINT to a "
                "SAM-Med3D / M-SAM .pth or msam .safetensors file")
    return None


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    metrics: RedisMetrics
    storage: Storage
    cache: RedisEmbeddingCache
    _model: Any = None
    _volumes: OrderedDict[str, Volume] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def model_loaded(self) -> bool:
        return self._model is not None

    def model(self) -> LoadedModel:
        """The checkpoint (network and pipeline options), loaded on first use;
        :class:`InvalidCheckpoint` with the reason if not."""
        with self._lock:
            if self._model is None:
                problem = checkpoint_problem(self.settings)
                if problem:
                    self._report_model(problem)
                    raise InvalidCheckpoint(problem)
                from msam_core.checkpoints import load_model

                if self.settings.torch_threads > 0:
                    import torch

                    torch.set_num_threads(self.settings.torch_threads)

                try:
                    self._model = load_model(self.settings.checkpoint_path(), device=self.settings.device)
                except InvalidCheckpoint as exc:
                    self._report_model(str(exc))
                    raise
                logger.info("model %s (%s) loaded on %s", self._model.name, self._model.version, self.settings.device)
                self._report_model("", self._model.describe())
            return self._model

    def cache_for(self, tenant: str) -> RedisEmbeddingCache:
        """The embedding cache a job of ``tenant`` uses, with its own hit counts: the tenant's
        namespace, or the one shared cache when ``MSAM_SHARED_EMBEDDING_CACHE`` is on."""
        if self.settings.shared_embedding_cache:
            return self.cache.scoped("")
        return self.cache.scoped(tenant_namespace(tenant))

    def volume(self, info: VolumeInfo) -> tuple[Volume, bool]:
        """The decoded volume (``True`` when it came from this process's memory)."""
        cached = self._volumes.get(info.volume_id)
        if cached is not None:
            self._volumes.move_to_end(info.volume_id)
            self.storage.touch(f"volumes/{info.volume_id}")
            return cached, True
        volume = open_volume(self.storage, info)
        self._volumes[info.volume_id] = volume
        while len(self._volumes) > max(0, self.settings.volume_cache_items):
            self._volumes.popitem(last=False)
        return volume, False

    def _report_model(self, problem: str, description: dict | None = None) -> None:
        """Tell ``/readyz`` and ``/info`` (through the worker's heartbeat key) whether the model
        loaded, and which one."""
        fields = {"model_error": problem, "model_loaded": "0" if problem else "1"}
        if description is not None:
            fields["model"] = json.dumps(description)
        key = worker_key(worker_name())
        try:
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping=fields)
            pipe.ttl(key)
            _, ttl = pipe.execute()
            if ttl == -1:
                # written by a pool child after its main process had gone (the record had
                # expired): it gets the heartbeat's expiry instead of living for ever
                self.redis.expire(key, WORKER_TTL_S)
        except redis.RedisError:
            pass


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        settings = get_settings()
        assert settings.redis_url, "REDIS_URL must be set for a worker"
        r = redis_conn.client(settings.redis_url)
        metrics = RedisMetrics(r)
        _runtime = Runtime(
            settings=settings, redis=r, store=JobStore(r, settings.job_ttl_s), metrics=metrics,
            storage=make_storage(settings.storage_dir),
            cache=RedisEmbeddingCache(r, settings.cache_ttl_s, settings.cache_max_mb * 2**20, metrics))
    return _runtime
