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

import base64
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from msam_service.redis_conn import celery_url
from msam_service.sessions import DONE, FAILED, INTERACT_TASK, RUNNING, SessionStore, worker_queue
from msam_service.settings import Settings

logger = logging.getLogger(__name__)

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


#: Seconds a worker's liveness record lives after its last write (its heartbeat beats every 5 s).
WORKER_TTL_S = 20


def worker_key(name: str) -> str:
    """The liveness record of the worker ``name`` (``host:pid`` of its main process; a glob
    pattern such as ``"*"`` matches several): a Redis hash its heartbeat refreshes, which expires
    :data:`WORKER_TTL_S` after the last beat."""
    return f"msam:worker:{name}"


def _live(r: Any) -> Iterator[tuple[str, dict[str, str]]]:
    """``(name, liveness record)`` of each worker that beat recently (one scan of the records); a
    record without ``alive_at`` (a worker still starting) is left out."""
    prefix = worker_key("")
    for key in r.scan_iter(match=worker_key("*"), count=100):
        record = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
        if "alive_at" in record:
            name = key.decode() if isinstance(key, bytes) else key
            yield name[len(prefix):], record


def live_workers(r: Any) -> list[dict[str, str]]:
    """The liveness records (decoded hashes) of the workers that beat recently; a record without
    ``alive_at`` (a worker still starting) is left out."""
    return [record for _, record in _live(r)]


def worker_alive(r: Any, name: str) -> bool:
    """Whether the worker ``name`` beat recently: its liveness record exists and holds
    ``alive_at`` (as in :func:`live_workers`; a worker's first beat comes before it takes any
    message of its own queue). A record without it is what a pool child wrote after its main
    process had gone."""
    return bool(r.hexists(worker_key(name), "alive_at"))


# -- the queues of lost workers ---------------------------------------------------------------
#: The lock that lets one process at a time sweep the queues of lost workers (held, not released,
#: for the sweep interval: it also spaces the sweeps out).
SWEEP_LOCK = "msam:lock:worker-queue-sweep"
#: How kombu's Redis transport names a queue's list per message priority (``name`` + separator +
#: priority; priority 0 is the list ``name`` itself).
_PRIORITY_SEP = "\x06\x16"
#: The routing tables kombu keeps per exchange (a worker's queue has an exchange of its name).
_BINDINGS = ("_kombu.binding.", "_kombu.binding_permanent.")


@dataclass
class SweepReport:
    queues: int = 0    # lost workers' queues removed
    resent: int = 0    # interactions handed to the shared queue (each one's only resend)
    dropped: int = 0   # copies not run: answered already, resent already, expired, or running elsewhere
    moved: int = 0     # other messages put on the shared queue as they were


def lost_worker_queues(r: redis.Redis, queue: str) -> dict[str, list[str]]:
    """The Redis keys of the per-worker queues (:func:`msam_service.sessions.worker_queue`) whose
    worker does not beat (:func:`worker_alive`), by worker name: their lists and their exchange's
    bindings."""
    prefix = worker_queue(queue, "")
    found: dict[str, list[str]] = {}
    for strip in ("", *_BINDINGS):
        for raw in r.scan_iter(match=strip + prefix + "*", count=1000):
            key = raw.decode()
            name = key[len(strip) + len(prefix):].split(_PRIORITY_SEP, 1)[0]
            found.setdefault(name, []).append(key)
    return {name: sorted(keys) for name, keys in found.items() if not worker_alive(r, name)}


def _task_of(raw: bytes) -> tuple[str, list[Any]] | None:
    """A Celery message (protocol 2, as kombu stores it in Redis) -> its task name and args."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(message["headers"]["task"]), list(args)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def sweep_lost_worker_queues(r: redis.Redis, queue: str, store: SessionStore,
                             send_interaction: Callable[[str], None]) -> SweepReport:
    """Empty and remove the queues of workers that are gone.

    Each message is taken off its list atomically (so two sweeps never handle the same one). An
    interaction is sent again to the shared ``queue`` (``send_interaction``) when nobody did it
    before: the claim is the interaction's ``resent`` mark (:meth:`SessionStore.claim_resend`),
    the same one the gateway takes when it resends an interaction whose worker is lost, so an
    interaction runs at most once more, whoever notices first. A copy is dropped when the
    interaction was answered (done or failed), resent already, has expired, or is running on a
    live worker. Any other message is put on the shared queue unchanged. A sweep that dies
    between taking a message and sending it loses that copy; the gateway still resends the
    interaction to a client that waits on it."""
    report = SweepReport()
    for name, keys in lost_worker_queues(r, queue).items():
        bindings = [k for k in keys if k.startswith(_BINDINGS)]
        for key in keys:
            if key in bindings:
                continue
            while (raw := r.rpop(key)) is not None:  # the oldest first
                task = _task_of(raw)  # type: ignore[arg-type]
                if task is None or task[0] != INTERACT_TASK or len(task[1]) != 1:
                    r.lpush(queue, raw)  # type: ignore[arg-type]
                    report.moved += 1
                    continue
                interaction_id = str(task[1][0])
                rec = store.interaction(interaction_id)
                running_elsewhere = (rec is not None and rec["status"] == RUNNING and bool(rec.get("worker"))
                                     and worker_alive(r, rec["worker"].split("/", 1)[0]))
                if (rec is None or rec["status"] in (DONE, FAILED) or rec.get("resent") or running_elsewhere
                        or not store.claim_resend(interaction_id, queue)):
                    report.dropped += 1
                    continue
                send_interaction(interaction_id)
                report.resent += 1
        if bindings:
            r.delete(*bindings)
        report.queues += 1
        logger.info("removed the queue of lost worker %s", name)
    return report


def send_interaction(app: Celery, interaction_id: str, queue: str) -> None:
    """Send an interaction (its record says where: :class:`msam_service.sessions.SessionStore`)."""
    app.send_task(INTERACT_TASK, args=[interaction_id], queue=queue, ignore_result=True)


def live_worker_names(r: Any) -> list[str]:
    """The names (``host:pid``) of the workers that beat (:func:`worker_alive`), sorted."""
    return sorted(name for name, _ in _live(r))


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

