"""The Celery task: thin; the work is in :mod:`worker.job`."""

from __future__ import annotations

import time
from typing import Any

import redis
from billiard.exceptions import TimeLimitExceeded
from celery import Task

from msam_service import jobs
from msam_service.queue import TASK_NAME
from msam_service.sessions import COMMIT_TASK, INTERACT_TASK, OPEN_TASK
from worker import pacs_tasks  # PACS pull before a job, push + webhook after it; msam.webhook
from worker.celery_app import app
from worker.job import run_job
from worker.runtime import get_runtime
from worker.session import run_commit, run_interaction, run_open


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
            pacs_tasks.finish(rt, task_id, push_results=False)


@app.task(name=TASK_NAME, bind=True, base=SegmentTask, acks_late=True, reject_on_worker_lost=True)
def segment(self: Task, job_id: str) -> str | None:
    def progress(stage: str, fraction: float) -> None:
        self.update_state(state="PROGRESS", meta={"stage": stage, "progress": fraction})

    rt = get_runtime()
    pacs_tasks.prepare(rt, job_id)
    status = run_job(rt, job_id, progress)
    pacs_tasks.finish(rt, job_id)
    return status


@app.task(name=OPEN_TASK, ignore_result=True, acks_late=False)
def open_session(session_id: str) -> None:
    """A new session's volume, decoded ahead of its first click."""
    run_open(get_runtime(), session_id)


@app.task(name=INTERACT_TASK, ignore_result=True, acks_late=False)
def interact(interaction_id: str) -> str | None:
    """One interaction of a session (acknowledged on receipt: when its worker is lost, the
    gateway sends it again to the shared queue, see ``api/routes/sessions.py``)."""
    return run_interaction(get_runtime(), interaction_id)


@app.task(name=COMMIT_TASK, bind=True, base=SegmentTask, acks_late=True, reject_on_worker_lost=True)
def commit(self: Task, job_id: str) -> str | None:
    """A session's outputs, written as the job ``job_id``'s, then sent like a job's."""
    rt = get_runtime()
    status = run_commit(rt, job_id)
    pacs_tasks.finish(rt, job_id)
    return status
