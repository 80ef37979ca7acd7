"""Celery configuration shared by the sender (api/) and the consumer (worker/).

The message carries only the job id; the request lives in the job record
(:mod:`msam_service.jobs`). Reliability settings:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job whose worker dies is put back on
  the queue (the worker counts deliveries and fails a job after ``max_deliveries``).
- ``worker_prefetch_multiplier = 1``: a worker holds one job at a time (jobs are long).
- ``visibility_timeout`` above the hard time limit, set in every place Celery reads it (broker
  transport options, result backend transport options, and the top-level setting), so a job
  that is still running is never handed to a second worker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from msam_service.redis_conn import celery_url
from msam_service.settings import Settings

TASK_NAME = "msam.segment"
#: Network I/O tasks (the I/O worker, ``worker.io_app``): retrieve a job's series from its archive,
#: then queue the segmentation; deliver a finished job's results (DICOM pushes, HL7, FHIR, webhook).
RETRIEVE_TASK = "msam.io.retrieve"
DELIVER_TASK = "msam.io.deliver"
WEBHOOK_TASK = "msam.webhook"
IO_TASKS = (RETRIEVE_TASK, DELIVER_TASK, WEBHOOK_TASK)


def celery_config(settings: Settings) -> dict[str, Any]:
    if not settings.redis_url:
        raise RuntimeError("MSAM_REDIS_URL / REDIS_URL is not set (run `msam serve` to embed Redis)")
    url = celery_url(settings.redis_url)
    vt = settings.visibility_timeout_s
    return {
        "broker_url": url,
        "result_backend": url,
        # a consumer looks for messages past the timeout every interval x throttle seconds
        # (kombu's default: 10 x 10); scan every vt/10 so a lost job waits ~1.1 x vt, not 2 x.
        # The scan holds a Redis lock; a worker killed while holding it would stop every other
        # worker's scans until the lock expires (kombu's default: 300 s), so it expires after
        # vt/5 (5 to 60 s): far longer than a scan takes, shorter than the timeout itself.
        "broker_transport_options": {"visibility_timeout": vt,
                                     "unacked_restore_interval": max(1, min(60, vt // 10)),
                                     "unacked_restore_throttle": 1,
                                     "unacked_mutex_expire": max(5, min(60, vt // 5))},
        "result_backend_transport_options": {"visibility_timeout": vt},
        "visibility_timeout": vt,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue},
                        **{name: {"queue": settings.io_queue} for name in IO_TASKS}},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": settings.job_time_limit_s,
        "task_track_started": True,
        "result_expires": settings.job_ttl_s,
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
    }


def worker_key(name: str) -> str:
    """The liveness record of the worker ``name`` (``host:pid`` of its main process; a glob
    pattern such as ``"*"`` matches several): a Redis hash its heartbeat refreshes."""
    return f"msam:worker:{name}"


def live_workers(r: Any) -> list[dict[str, str]]:
    """The liveness records (decoded hashes) of the workers that beat recently; a record without
    ``alive_at`` (a worker still starting) is left out."""
    out = []
    for key in r.scan_iter(match=worker_key("*"), count=100):
        record = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
        if "alive_at" in record:
            out.append(record)
    return out


def live_worker_names(r: Any) -> list[str]:
    """The names (``host:pid``) of the workers :func:`live_workers` lists, sorted."""
    prefix = worker_key("")
    names = []
    for key in r.scan_iter(match=worker_key("*"), count=100):
        name = key.decode() if isinstance(key, bytes) else key
        if r.hexists(name, "alive_at"):
            names.append(name[len(prefix):])
    return sorted(names)


def make_celery(settings: Settings, name: str = "msam") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def enqueue(app: Celery, job_id: str) -> None:
    """Send the job (the Celery task id is the job id)."""
    app.send_task(TASK_NAME, args=[job_id], task_id=job_id)


def enqueue_retrieval(app: Celery, job_id: str) -> None:
    """Send a job whose series is still in an archive to the I/O worker, which retrieves it and
    then queues the segmentation (:func:`enqueue`)."""
    app.send_task(RETRIEVE_TASK, args=[job_id], task_id=f"{job_id}-retrieve")


def enqueue_delivery(app: Celery, job_id: str) -> None:
    """Send a finished job to the I/O worker for its deliveries (pushes, HL7, FHIR, webhook)."""
    app.send_task(DELIVER_TASK, args=[job_id])


#: request fields that give a finished job something to deliver
DELIVERY_FIELDS = ("destinations", "callback_url", "ris", "fhir")


def needs_delivery(request: dict[str, Any]) -> bool:
    return any(request.get(name) for name in DELIVERY_FIELDS)
