"""The Celery task: thin; the work is in :mod:`worker.job`. Segmentation only: a job's series is
retrieved, and its results delivered, by the I/O worker (:mod:`worker.io_tasks`)."""

from __future__ import annotations

import time
from typing import Any

import redis
from billiard.exceptions import TimeLimitExceeded
from celery import Task

from msam_service import jobs
from msam_service.queue import TASK_NAME, enqueue_delivery, needs_delivery
from worker.celery_app import app
from worker.job import run_job
from worker.runtime import get_runtime


def _deliver(job_id: str) -> None:
    """Hand a finished job's deliveries (DICOM pushes, RIS, FHIR, webhook) to the I/O worker."""
    rec = get_runtime().store.get(job_id)
    if rec is not None and rec.status in jobs.FINISHED and needs_delivery(rec.request):
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
