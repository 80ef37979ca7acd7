"""Liveness for ``/readyz`` and ``/info``: the worker's main process refreshes
``msam:worker:<host>:<pid>`` (expires 3 beats after the last one) with whether its checkpoint is
usable and what the file says it is (:func:`msam_core.checkpoint_info.describe`, read once,
without torch). The pool child adds the loaded model's own record once it has it
(:meth:`worker.runtime.Runtime.model`).

The same loop empties the own queues of lost workers (``sweep``,
:func:`msam_service.queue.sweep_lost_worker_queues`): every live worker tries, one at a time
holds :data:`msam_service.queue.SWEEP_LOCK`, at most once per ``MSAM_WORKER_QUEUE_SWEEP_S``."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import redis

from msam_service.queue import SWEEP_LOCK, WORKER_TTL_S
from msam_service.settings import Settings
from worker.runtime import checkpoint_problem, worker_key

logger = logging.getLogger(__name__)

BEAT_S = 5.0


class Heartbeat:
    def __init__(self, r: redis.Redis, name: str, settings: Settings,
                 sweep: Callable[[], object] | None = None) -> None:
        self.r = r
        self.name = name
        self.key = worker_key(name)
        self.sweep = sweep
        self.settings = settings
        self.checkpoint = self._describe()
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

    def _describe(self) -> str:
        """The configured checkpoint's record as JSON ("" when it is missing or unreadable: the
        problem is reported as ``checkpoint_error`` / ``model_error``)."""
        from msam_core.checkpoint_info import describe

        if checkpoint_problem(self.settings):
            return ""
        try:
            return json.dumps(describe(self.settings.checkpoint_path()))
        except Exception as exc:  # an unreadable file: loading it will say why
            logger.warning("cannot describe the checkpoint (%s)", type(exc).__name__)
            return ""

    def beat(self) -> None:
        problem = checkpoint_problem(self.settings) or ""
        pipe = self.r.pipeline()
        pipe.hset(self.key, mapping={"alive_at": time.time(), "checkpoint_error": problem,
                                     "device": self.settings.device, "checkpoint": self.checkpoint})
        pipe.expire(self.key, WORKER_TTL_S)
        pipe.execute()

    def sweep_if_due(self) -> bool:
        """Run ``sweep`` when no other worker swept within ``MSAM_WORKER_QUEUE_SWEEP_S``."""
        if self.sweep is None:
            return False
        interval_ms = max(1, int(self.settings.worker_queue_sweep_s * 1000))
        if not self.r.set(SWEEP_LOCK, self.name, nx=True, px=interval_ms):
            return False
        self.sweep()
        return True

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.beat()
            except redis.RedisError:
                continue
            try:
                self.sweep_if_due()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                logger.warning("sweeping lost workers' queues failed: %s", type(exc).__name__)
