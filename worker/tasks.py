"""The Celery tasks: thin; the work is in :mod:`worker.job` and :mod:`worker.session`. Segmentation
only: a job's series is retrieved, and its results delivered, by the I/O worker
(:mod:`worker.io_tasks`)."""

from __future__ import annotations

import time
from typing import Any

import redis
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task, signals

from msam_service import jobs
from msam_service.queue import TASK_NAME, enqueue_delivery, send_interaction
from msam_service.sessions import COMMIT_TASK, INTERACT_TASK, OPEN_TASK
from worker.celery_app import app
from worker.job import run_job
from worker.runtime import get_runtime
from worker.session import lost_interaction, run_commit, run_interaction, run_open


def _deliver(job_id: str) -> None:
    """Hand a finished job's deliveries (DICOM pushes, RIS, FHIR, webhook) to the I/O worker."""
    rec = get_runtime().store.get(job_id)
    if rec is not None and rec.status in jobs.FINISHED and rec.request.needs_delivery:
        enqueue_delivery(app, job_id)


class SegmentTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """The job's process was killed at the hard time limit (this runs in the main process),
        or something escaped :func:`run_job` (e.g. Redis went away mid-job)."""
        rt = get_runtime()
        if isinstance(exc, TimeLimitExceeded):
            error = {"code": "timeout", "message": f"the job ran longer than {rt.settings.job_time_limit_s} s "
                     "and its process was stopped; try fewer lesions or a smaller max_windows"}
        else:
            error = {"code": "internal_error", "message": f"the worker failed unexpectedly "
                     f"({type(exc).__name__}); the job can be submitted again"}
        try:
            failed = rt.store.transition(task_id, jobs.FAILED, (jobs.QUEUED, jobs.RUNNING),
                                         finished_at=time.time(), stage="failed", error=error)
        except redis.RedisError:
            return  # the record expires; nothing else to do without Redis
        if failed:
            rt.metrics.incr("jobs_failed")
            _deliver(task_id)


@app.task(name=TASK_NAME, bind=True, base=SegmentTask, acks_late=True, reject_on_worker_lost=True)
def segment(self: Task, job_id: str) -> str | None:
    def progress(stage: str, fraction: float) -> None:
        self.update_state(state="PROGRESS", meta={"stage": stage, "progress": fraction})

    status = run_job(get_runtime(), job_id, progress)
    if status is not None:
        _deliver(job_id)
    return status


@app.task(name=OPEN_TASK, ignore_result=True, acks_late=False)
def open_session(session_id: str) -> None:
    """A new session's volume, decoded ahead of its first click."""
    run_open(get_runtime(), session_id)


@app.task(name=INTERACT_TASK, bind=True, ignore_result=True, acks_late=False)
def interact(self: Task, interaction_id: str) -> str | None:
    """One interaction of a session (acknowledged on receipt: when its worker is lost, the
    gateway sends it again to the shared queue, see ``api/routes/sessions.py``)."""
    delivered_from = (self.request.delivery_info or {}).get("routing_key")
    return run_interaction(get_runtime(), interaction_id, delivered_from=delivered_from)


@signals.task_failure.connect(sender=interact)
def _interaction_lost(task_id: str | None = None, exception: BaseException | None = None,
                      args: Any = None, **_: Any) -> None:
    """The pool process answering an interaction died (the main process reports it here)."""
    if isinstance(exception, WorkerLostError) and args:
        try:
            lost_interaction(get_runtime(), str(args[0]),
                             lambda interaction_id, queue: send_interaction(app, interaction_id, queue))
        except redis.RedisError:
            pass  # the gateway's wait fails it as a lost interaction once its record expires


@app.task(name=COMMIT_TASK, bind=True, base=SegmentTask, acks_late=True, reject_on_worker_lost=True)
def commit(self: Task, job_id: str) -> str | None:
    """A session's outputs, written as the job ``job_id``'s, then delivered like a job's (by the
    I/O worker: DICOM pushes, webhook)."""
    status = run_commit(get_runtime(), job_id)
    if status is not None:
        _deliver(job_id)
    return status
