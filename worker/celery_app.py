"""The Celery application of the workers: ``celery -A worker.celery_app worker``.

One worker process per GPU (``CUDA_VISIBLE_DEVICES``), ``--concurrency 1``: the model is loaded
once per pool child, lazily, on its first job (:mod:`worker.runtime`); the main process only
consumes messages and reports liveness (:mod:`worker.heartbeat`).

Logs carry no DICOM UID (:mod:`msam_service.log_privacy`): redaction is installed before Celery
sets up its handlers, and the filter is added to the handlers Celery creates (root and task
loggers), in the main process and in the pool children, which inherit both.
"""

from __future__ import annotations

import logging
import os

from celery import signals

from msam_service import log_privacy, redis_conn
from msam_service.metrics import RedisMetrics
from msam_service.queue import make_celery
from msam_service.settings import get_settings

logger = logging.getLogger(__name__)
log_privacy.install()

settings = get_settings()
app = make_celery(settings, "msam-worker")
app.conf.include = ["worker.tasks"]

_heartbeat = None


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_celery_handlers(logger: logging.Logger | None = None, **_: object) -> None:
    if logger is not None:
        log_privacy.attach(logger)
    log_privacy.attach(logging.getLogger())


@signals.worker_init.connect
def _mark_main(**_: object) -> None:
    # children inherit it: worker_name() is the main process's in every pool child
    os.environ["MSAM_WORKER_MAIN_PID"] = str(os.getpid())


@signals.worker_ready.connect
def _start_heartbeat(sender: object = None, **_: object) -> None:
    global _heartbeat
    from msam_service.queue import send_interaction, sweep_lost_worker_queues
    from msam_service.sessions import SessionStore, worker_queue
    from worker.heartbeat import Heartbeat
    from worker.runtime import checkpoint_problem, worker_name

    assert settings.redis_url
    r = redis_conn.client(settings.redis_url)
    store = SessionStore(r, settings.job_ttl_s)

    def sweep() -> None:
        report = sweep_lost_worker_queues(r, settings.queue, store,
                                          lambda iid: send_interaction(app, iid, settings.queue))
        if report.resent:
            RedisMetrics(r).incr("interactions_resent", report.resent)
        if report.queues:
            logger.info("lost workers' queues removed: %d (interactions resent: %d, copies dropped: %d, "
                        "other messages moved: %d)", report.queues, report.resent, report.dropped, report.moved)

    # alive before it consumes a queue of its own, so no sweep takes that queue for a lost worker's
    _heartbeat = Heartbeat(r, worker_name(), settings, sweep=sweep)
    _heartbeat.start()
    if sender is not None:  # the consumer: also take the interactions routed to this worker alone
        sender.add_task_queue(worker_queue(settings.queue, worker_name()))  # type: ignore[attr-defined]
    problem = checkpoint_problem(settings)
    if problem:
        logger.error("%s; jobs will fail with this message until it is fixed", problem)


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: object) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
