"""The worker's PACS hooks around a job (issue #8), and the webhook task.

- :func:`prepare`, before :func:`worker.job.run_job`: a job whose source is a DICOMweb node
  gets its series retrieved by WADO-RS and stored as the volume the API reserved for it; a
  failure ends the job ``failed`` with the node's name and the reason (code ``pacs_error``).
- :func:`finish`, after it: a succeeded job's DICOM-SEG, and its measurement SR unless the
  request's ``send`` asks for the SEG only, are stored to each destination (STOW-RS for a
  DICOMweb node, C-STORE for an AE), each destination's outcome kept in the job record
  (``destinations_status``); then, once per job, the webhook is queued.
- ``msam.webhook``: one signed POST per attempt, retried with exponential backoff by Celery
  (``countdown``, capped below the visibility timeout so a waiting retry is never redelivered).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Task

from msam_core.errors import MsamError
from msam_core.io.volume import Volume
from msam_service import jobs
from msam_service.pacs import dicomweb, dimse_sender, nodes, webhooks
from msam_service.pacs.ingest import ingest_series
from msam_service.pacs.lines import prompts_from_lines, wants_lines
from msam_service.pacs.settings import get_pacs_settings
from msam_service.volumes import load_info, open_volume
from worker.celery_app import app
from worker.runtime import Runtime

logger = logging.getLogger(__name__)

WEBHOOK_TASK = "msam.webhook"
PUSH_ATTEMPTS = 3


def _fail(rt: Runtime, job_id: str, code: str, message: str) -> None:
    if rt.store.transition(job_id, jobs.FAILED, (jobs.QUEUED, jobs.RUNNING), finished_at=time.time(),
                           stage="failed", error={"code": code, "message": message}):
        rt.metrics.incr("jobs_failed")
        logger.info("job %s failed: %s", job_id, code)


def prepare(rt: Runtime, job_id: str) -> None:
    """Retrieve a DICOMweb source into the job's volume (no-op for other jobs)."""
    rec = rt.store.get(job_id)
    if rec is None or rec.status in jobs.FINISHED:
        return
    src = rec.request.get("source") or {}
    if "pacs" not in src:
        return  # not a DICOMweb job
    info = load_info(rt.storage, rec.volume_id)
    lines = wants_lines(rec.request)
    if info is not None and not lines:
        return  # already retrieved by an earlier delivery
    pacs = get_pacs_settings()
    rt.store.update(job_id, stage="retrieve", progress=0.01)
    staging = rt.storage.staging_dir()
    t0 = time.perf_counter()
    try:
        node = nodes.dicomweb_node(pacs, src["pacs"])
        volume = None
        if info is None:
            files = dicomweb.retrieve_series(node, src["study_uid"], src["series_uid"], staging / "wado",
                                             max_instances=pacs.dicom_max_instances, timeout=pacs.dicomweb_timeout_s)
            _, volume = ingest_series(rt.storage, staging, files, rec.volume_id, src["series_uid"])
            logger.info("job %s: series retrieved from %s in %.2f s", job_id, node.name, time.perf_counter() - t0)
        if lines:
            if volume is None:
                volume = open_volume(rt.storage, load_info(rt.storage, rec.volume_id))
            _lines_to_prompts(rt, job_id, rec, node, src, volume)
    except (nodes.PacsError, nodes.UnknownNode) as exc:
        _fail(rt, job_id, "pacs_error", str(exc))
    except MsamError as exc:
        _fail(rt, job_id, exc.code, str(exc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _lines_to_prompts(rt: Runtime, job_id: str, rec: jobs.JobRecord, node: nodes.DicomwebNode,
                      src: dict[str, str], volume: Volume) -> None:
    """The study's line measurements on the series become the job's lesions (one per line)."""
    pacs = get_pacs_settings()
    doc = prompts_from_lines(node, src["study_uid"], volume, max_lesions=rt.settings.max_lesions,
                             timeout=pacs.dicomweb_timeout_s)
    rt.store.update(job_id, request=dict(rec.request, prompts=doc))
    logger.info("job %s: %d line measurement(s) from %s as prompts", job_id, len(doc["lesions"]), node.name)


def push(rt: Runtime, job_id: str, names: list[str], files: list[Path]) -> dict[str, str]:
    """Store ``files`` (the SEG, then the SR) to each destination; returns name -> ``stored`` or why not."""
    pacs = get_pacs_settings()
    outcome: dict[str, str] = {}
    for name in names:
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            try:
                node = nodes.destination(pacs, name)
                if isinstance(node, nodes.DicomwebNode):
                    dicomweb.store(node, files, timeout=pacs.dicomweb_timeout_s)
                else:
                    dimse_sender.send(node, files, calling_ae=pacs.dicom_ae_title)
                outcome[name] = "stored"
                break
            except nodes.UnknownNode as exc:
                outcome[name] = f"failed: {exc}"
                break
            except nodes.PacsError as exc:
                outcome[name] = f"failed: {exc}"
                if attempt < PUSH_ATTEMPTS:
                    time.sleep(attempt)
            except Exception as exc:  # never let one destination stop the others
                outcome[name] = f"failed: {type(exc).__name__}"
                logger.error("job %s: pushing to %s failed: %s", job_id, name, type(exc).__name__)
                break
        logger.info("job %s: destination %s: %s", job_id, name, outcome[name].split(":")[0])
    return outcome


def finish(rt: Runtime, job_id: str, push_results: bool = True) -> None:
    """After a job: push the DICOM-SEG to the destinations, then queue the webhook (once)."""
    try:
        rec = rt.store.get(job_id)
        if rec is None or rec.status not in jobs.FINISHED:
            return
        names = list(rec.request.get("destinations") or [])
        status_of: dict[str, str] = {}
        if names and rec.status == jobs.SUCCEEDED and push_results:
            if "dicom-seg" in rec.results:
                send_sr = "sr" in rec.request.get("send", ["dicom-seg", "sr"]) and "sr" in rec.results
                with contextlib.ExitStack() as stack:
                    files = [stack.enter_context(rt.storage.local_copy(f"jobs/{job_id}/seg.dcm"))]
                    if send_sr:
                        files.append(stack.enter_context(rt.storage.local_copy(f"jobs/{job_id}/sr.dcm")))
                    status_of = push(rt, job_id, names, files)
            else:
                why = rec.result_errors.get("dicom-seg", "no DICOM-SEG was written")
                status_of = {n: f"not sent: {why}" for n in names}
            rt.store.update(job_id, destinations_status=json.dumps(status_of))
        url = rec.request.get("callback_url")
        if url and rt.redis.set(f"msam:webhook:{job_id}", "queued", nx=True, ex=rt.settings.job_ttl_s):
            payload = webhook_payload(rt, rec, status_of)
            app.send_task(WEBHOOK_TASK, args=[job_id, url, webhooks.encode(payload).decode(), uuid.uuid4().hex])
    except Exception as exc:  # the job's own outcome is already recorded
        logger.error("job %s: PACS follow-up failed: %s", job_id, type(exc).__name__)


def webhook_payload(rt: Runtime, rec: jobs.JobRecord, destinations: dict[str, str]) -> dict[str, Any]:
    base = str(rec.request.get("base_url") or rt.settings.public_url or "").rstrip("/")
    results = {f: f"{base}/jobs/{rec.job_id}/result?format={f}" for f in rec.results} \
        if rec.status == jobs.SUCCEEDED else {}
    return {"event": "job.finished", "job_id": rec.job_id, "status": rec.status,
            "job_url": f"{base}/jobs/{rec.job_id}", "volume_id": rec.volume_id, "results": results,
            "destinations": destinations, "error": rec.error, "source": rec.request.get("source"),
            "finished_at": rec.finished_at}


@app.task(name=WEBHOOK_TASK, bind=True, acks_late=True, ignore_result=True)
def webhook(self: Task, job_id: str, url: str, body: str, delivery_id: str) -> str:
    pacs = get_pacs_settings()
    rt_settings = app.conf
    try:
        webhooks.check_callback(url, pacs.allowlist(), pacs.webhook_secret)  # the allowlist may have changed
    except webhooks.CallbackNotAllowed as exc:
        logger.warning("job %s: webhook not sent: %s", job_id, exc)
        return "refused"
    ok, retry, reason = webhooks.post_once(url, body.encode(), pacs.webhook_secret, delivery_id,
                                           "job.finished", timeout=pacs.webhook_timeout_s)
    attempt = self.request.retries + 1
    if ok:
        logger.info("job %s: webhook delivered (attempt %d, %s)", job_id, attempt, reason)
        return "delivered"
    if retry and self.request.retries < pacs.webhook_retries:
        cap = max(1.0, float(rt_settings.get("visibility_timeout", 900)) / 2)
        delay = webhooks.backoff(attempt, pacs.webhook_backoff_s, cap)
        logger.info("job %s: webhook attempt %d failed (%s); retry in %.1f s", job_id, attempt, reason, delay)
        raise self.retry(countdown=delay, max_retries=pacs.webhook_retries)
    logger.warning("job %s: webhook failed after %d attempt(s) (%s)", job_id, attempt, reason)
    return "failed"
