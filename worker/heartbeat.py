"""Liveness for ``/readyz``: the worker's main process refreshes ``msam:worker:<host>:<pid>``
(expires 3 beats after the last one) with whether its checkpoint is usable."""

from __future__ import annotations

import threading
import time

import redis

from msam_service.settings import Settings
from worker.runtime import checkpoint_problem, worker_key

BEAT_S = 5.0
TTL_S = 20


class Heartbeat:
    def __init__(self, r: redis.Redis, name: str, settings: Settings) -> None:
        self.r = r
        self.key = worker_key(name)
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="msam-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.r.delete(self.key)
        except redis.RedisError:
            pass

    def beat(self) -> None:
        problem = checkpoint_problem(self.settings) or ""
        pipe = self.r.pipeline()
        pipe.hset(self.key, mapping={"alive_at": time.time(), "checkpoint_error": problem,
                                     "device": self.settings.device})
        pipe.expire(self.key, TTL_S)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.beat()
            except redis.RedisError:
                continue
