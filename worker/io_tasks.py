"""The I/O worker's tasks: everything a job exchanges with archives, the RIS and webhooks.

- ``msam.io.retrieve`` (:func:`retrieve`): a job whose image is in an archive. The series is
  fetched (WADO-RS, C-GET, or C-MOVE to msam's listener, as the node is configured) into the
  volume the API reserved; a job with ``lines_from_pacs`` then gets its lesions from the line
  measurements stored with the study (:mod:`msam_service.pacs.lines`); then the segmentation is
  queued for the GPU workers. A failure is
  retried with exponential backoff (``MSAM_PACS_RETRIES``, ``MSAM_PACS_BACKOFF_S``) unless
  retrying cannot help (the series does not exist); the last one ends the job ``failed`` with
  code ``pacs_error`` and the node's name and reason.
- ``msam.io.deliver`` (:func:`deliver`): after a job ends, each *target* - a DICOM destination
  (STOW-RS or C-STORE of the DICOM-SEG, and of the measurement SR unless the request's ``send``
  leaves it out), the RIS (ORU^R01 over MLLP), a FHIR server - is sent
  once, then the webhook is queued once. See :class:`Ledger` for what makes "once" survive a
  worker killed mid-send.
- ``msam.webhook``: one signed POST per attempt, retried with backoff.

A job's ``destinations`` field shows each DICOM destination's state (``sending``, ``stored``,
``retrying: ...``, ``failed: ...``) and ``delivery`` the whole (``pending``, ``done``,
``failed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydicom
import redis
from celery import Task

from msam_core.errors import InvalidVolume, MsamError
from msam_service import jobs, redis_conn
from msam_service.contract import result_key
from msam_service.jobs import JobRecord, JobStore
from msam_service.metrics import RedisMetrics
from msam_service.pacs import dicomweb, dimse_retrieve, dimse_sender, nodes, received, webhooks
from msam_service.pacs.ingest import ingest_series
from msam_service.pacs.lines import prompts_from_lines
from msam_service.pacs.settings import PacsSettings, get_pacs_settings
from msam_service.queue import DELIVER_TASK, RETRIEVE_TASK, WEBHOOK_TASK, enqueue, enqueue_delivery
from msam_service.ris import fhir_send, hl7
from msam_service.ris.results import fhir_bundle, lesions_of, seg_url
from msam_service.settings import Settings, get_settings
from msam_service.storage import Storage, make_storage
from msam_service.volumes import load_info, open_volume
from worker.io_app import app

logger = logging.getLogger(__name__)


@dataclass
class IoContext:
    """What the I/O worker keeps between tasks (no model, no embedding cache)."""

    settings: Settings
    redis: redis.Redis
    store: JobStore
    storage: Storage
    metrics: RedisMetrics


_context: IoContext | None = None


def get_context() -> IoContext:
    global _context
    if _context is None:
        settings = get_settings()
        assert settings.redis_url, "REDIS_URL must be set for a worker"
        r = redis_conn.client(settings.redis_url)
        _context = IoContext(settings=settings, redis=r, store=JobStore(r, settings.job_ttl_s),
                             metrics=RedisMetrics(r), storage=make_storage(settings.storage_dir))
    return _context


def backoff(ctx: IoContext, pacs: PacsSettings, attempt: int) -> float:
    """Delay before retry ``attempt``: ``MSAM_PACS_BACKOFF_S`` doubled each time, capped below
    the visibility timeout so a waiting retry is never redelivered as lost."""
    return webhooks.backoff(attempt, pacs.pacs_backoff_s, max(1.0, ctx.settings.visibility_timeout_s / 2))


def fail(ctx: IoContext, job_id: str, code: str, message: str) -> bool:
    if ctx.store.transition(job_id, jobs.FAILED, (jobs.QUEUED, jobs.RUNNING), finished_at=time.time(),
                            stage="failed", error={"code": code, "message": message}):
        ctx.metrics.incr("jobs_failed")
        logger.info("job %s failed: %s", job_id, code)
        return True
    return False


# -- retrieval ---------------------------------------------------------------------------------
def _archived(rec: JobRecord) -> tuple[str, str, str]:
    """The node, study and series of the job's ``source`` (only such jobs are routed here)."""
    src = rec.request.source
    if src is None or src.pacs is None or src.study_uid is None or src.series_uid is None:
        raise InvalidVolume("the job names no series in an archive to retrieve")
    return src.pacs, src.study_uid, src.series_uid


def fetch_series(ctx: IoContext, pacs: PacsSettings, rec: JobRecord) -> None:
    """Fetch the job's series from its node and store it as the job's volume."""
    node_name, study_uid, series_uid = _archived(rec)
    node = nodes.source_node(pacs, node_name, rec.tenant)
    staging = ctx.storage.staging_dir()
    try:
        if isinstance(node, nodes.DicomwebNode):
            files = dicomweb.retrieve_series(node, study_uid, series_uid, staging / "wado",
                                             max_instances=pacs.dicom_max_instances, timeout=pacs.dicomweb_timeout_s)
        elif node.retrieve == "c-get":
            files = dimse_retrieve.c_get(node, study_uid, series_uid, staging / "cget", calling_ae=pacs.dicom_ae_title,
                                         max_instances=pacs.dicom_max_instances, timeout=pacs.dicomweb_timeout_s)
        else:
            _move(ctx, pacs, node, rec, study_uid, series_uid)
            return
        ingest_series(ctx.storage, staging, files, rec.volume_id, series_uid)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move(ctx: IoContext, pacs: PacsSettings, node: nodes.DimseNode, rec: JobRecord, study_uid: str,
          series_uid: str) -> None:
    """C-MOVE to the listener, then wait until the listener has stored the series as the job's
    volume (it completes a series ``MSAM_DICOM_IDLE_TIMEOUT_S`` after its last instance)."""
    ctx.redis.delete(received.moved_key(rec.volume_id))
    received.expect(ctx.redis, series_uid, rec.volume_id, ctx.settings.job_ttl_s)
    dimse_retrieve.c_move(node, study_uid, series_uid, calling_ae=pacs.dicom_ae_title, timeout=pacs.dicomweb_timeout_s)
    deadline = time.monotonic() + pacs.dicom_idle_timeout_s + pacs.dicomweb_timeout_s
    while time.monotonic() < deadline:
        outcome: Any = ctx.redis.get(received.moved_key(rec.volume_id))
        if outcome is not None:
            if outcome:
                raise InvalidVolume(outcome.decode() if isinstance(outcome, bytes) else str(outcome))
            return
        time.sleep(0.2)
    raise nodes.PacsError(f"C-MOVE from {node.name}: the listener ({node.move_destination}) did not receive the "
                          "series; check that the archive knows msam's listener under that AE title")


def lines_to_prompts(ctx: IoContext, pacs: PacsSettings, rec: JobRecord) -> None:
    """The study's line measurements on the job's series become its lesions, one per line (the
    job's request gets them as its prompts, so a retried delivery does not search again)."""
    node_name, study_uid, _ = _archived(rec)
    node = nodes.source_node(pacs, node_name, rec.tenant)
    if not isinstance(node, nodes.DicomwebNode):
        raise InvalidVolume(f"lines_from_pacs searches the study by QIDO-RS, which {node.name} (a DIMSE node) "
                            "does not offer; send prompts instead")
    volume = open_volume(ctx.storage, load_info(ctx.storage, rec.volume_id))
    doc = prompts_from_lines(node, study_uid, volume, max_lesions=ctx.settings.max_lesions,
                             timeout=pacs.dicomweb_timeout_s)
    ctx.store.update(rec.job_id, request=dataclasses.replace(rec.request, prompts=doc))
    logger.info("job %s: %d line measurement(s) from %s as prompts", rec.job_id, len(doc["lesions"]), node.name)


@app.task(name=RETRIEVE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def retrieve(self: Task, job_id: str) -> str:
    ctx = get_context()
    rec = ctx.store.get(job_id)
    if rec is None or rec.status in jobs.FINISHED:
        return "nothing to do"
    pacs = get_pacs_settings()
    attempt = self.request.retries + 1
    try:
        if load_info(ctx.storage, rec.volume_id) is None:  # else: fetched by a delivery that then died
            ctx.store.update(job_id, stage="retrieve", progress=0.01)
            t0 = time.perf_counter()
            fetch_series(ctx, pacs, rec)
            logger.info("job %s: series retrieved in %.2f s", job_id, time.perf_counter() - t0)
        if rec.request.wants_lines:
            lines_to_prompts(ctx, pacs, rec)
    except nodes.PacsError as exc:
        if not exc.permanent and self.request.retries < pacs.pacs_retries:
            delay = backoff(ctx, pacs, attempt)
            ctx.store.update(job_id, stage=f"retrieve (attempt {attempt} failed; retrying)")
            logger.info("job %s: retrieval attempt %d failed; retry in %.1f s", job_id, attempt, delay)
            raise self.retry(countdown=delay, max_retries=pacs.pacs_retries) from None
        tries = "" if exc.permanent else f" (after {attempt} attempt{'s' if attempt > 1 else ''})"
        return _failed(ctx, job_id, "pacs_error", f"{exc}{tries}")
    except nodes.UnknownNode as exc:  # the node was removed from the configuration meanwhile
        return _failed(ctx, job_id, "pacs_error", str(exc))
    except MsamError as exc:
        return _failed(ctx, job_id, exc.code, str(exc))
    ctx.store.update(job_id, stage="queued", progress=0.0)
    enqueue(app, job_id)
    return "retrieved"


def _failed(ctx: IoContext, job_id: str, code: str, message: str) -> str:
    if fail(ctx, job_id, code, message):
        enqueue_delivery(app, job_id)  # the RIS and the webhook hear of the failure too
    return "failed"


# -- delivery ----------------------------------------------------------------------------------
DONE, FAILED, SENDING, RETRY = "done", "failed", "sending", "retry"


class Ledger:
    """What was sent for a job, per target, in Redis (``msam:delivery:<job>``, one field per
    target, e.g. ``dicom:orthanc``): ``sending`` is written *before* a send and ``done`` after
    it. A delivery that finds ``done`` skips the target. One that finds ``sending`` knows a
    worker died during that send and, before sending again, asks the target whether it arrived
    (the SEG's SOP Instance UID by QIDO-RS on a DICOMweb node, by C-FIND on an AE); where a
    target cannot be asked (MLLP, FHIR) the retry carries the same identity (HL7 message control
    id, FHIR conditional create on the job's identifier), so the receiver keeps one."""

    def __init__(self, r: redis.Redis, job_id: str, ttl_s: int) -> None:
        self.r, self.key, self.ttl_s = r, f"msam:delivery:{job_id}", ttl_s

    def get(self, target: str) -> dict[str, Any]:
        raw: Any = self.r.hget(self.key, target)
        return json.loads(raw) if raw else {"state": "", "attempts": 0, "detail": ""}

    def set(self, target: str, state: str, attempts: int, detail: str = "") -> None:
        pipe = self.r.pipeline()
        pipe.hset(self.key, target, json.dumps({"state": state, "attempts": attempts, "detail": detail}))
        pipe.expire(self.key, self.ttl_s)
        pipe.execute()


@dataclass
class Target:
    key: str  # ledger field: kind:name
    name: str  # what the job shows (a destination's name)
    send: Callable[[], str]  # returns the detail shown when done
    confirm: Callable[[], bool] | None = None  # did an interrupted send arrive?


def targets(ctx: IoContext, pacs: PacsSettings, rec: JobRecord) -> tuple[list[Target], dict[str, str]]:
    """What to send for this job, and the destinations that will not be sent (name -> why)."""
    out: list[Target] = []
    skipped: dict[str, str] = {}
    names = list(rec.request.destinations)
    if names and rec.status == jobs.SUCCEEDED and "dicom-seg" in rec.results:
        for name in names:
            out.append(_dicom_target(ctx, pacs, rec, name))
    elif names:
        why = rec.result_errors.get("dicom-seg", "no DICOM-SEG was written") if rec.status == jobs.SUCCEEDED \
            else f"the job {rec.status}"
        skipped = {n: f"not sent: {why}" for n in names}
    fhir_name = rec.request.fhir
    if fhir_name and rec.status == jobs.SUCCEEDED:
        out.append(_fhir_target(ctx, pacs, rec, fhir_name))
    elif fhir_name:
        skipped[f"fhir:{fhir_name}"] = f"not sent: the job {rec.status}"
    ris_name = rec.request.ris
    if ris_name:  # the RIS hears of failures too (ORU^R01 with result status X)
        out.append(_ris_target(ctx, pacs, rec, ris_name))
    return out, skipped


def _base(ctx: IoContext, rec: JobRecord) -> str:
    return rec.request.base(ctx.settings.public_url).rstrip("/")


def _fhir_target(ctx: IoContext, pacs: PacsSettings, rec: JobRecord, name: str) -> Target:
    def send() -> str:
        endpoint = pacs.fhir_endpoints.get(name)
        if endpoint is None or not endpoint.allows(rec.tenant):
            raise nodes.UnknownNode(f"FHIR endpoint {name!r} is no longer configured for this tenant")
        body = fhir_bundle(rec, ctx.storage, _base(ctx, rec), transaction=True)
        return fhir_send.post_bundle(endpoint, name, body)

    return Target(key=f"fhir:{name}", name=f"fhir:{name}", send=send)


def _ris_target(ctx: IoContext, pacs: PacsSettings, rec: JobRecord, name: str) -> Target:
    def send() -> str:
        endpoint = pacs.ris_endpoints.get(name)
        if endpoint is None or endpoint.tenant != rec.tenant or endpoint.oru_host is None or endpoint.oru_port is None:
            raise nodes.UnknownNode(f"RIS endpoint {name!r} is no longer configured for this tenant")
        lesions = lesions_of(rec, ctx.storage) if rec.status == jobs.SUCCEEDED else []
        message = hl7.oru(rec, lesions, seg_url(rec, _base(ctx, rec)), instance_uid(ctx, rec, "dicom-seg"),
                          instance_uid(ctx, rec, "sr"))
        hl7.send(endpoint.oru_host, endpoint.oru_port, message, timeout=endpoint.timeout_s, what=f"RIS {name}")
        return "sent"

    return Target(key=f"ris:{name}", name=f"ris:{name}", send=send)


def instance_uid(ctx: IoContext, rec: JobRecord, result: str) -> str:
    """The SOP Instance UID of the job's ``dicom-seg`` or ``sr`` result (what a RIS or a viewer
    asks the archive for); empty when the job has no such result."""
    if rec.status != jobs.SUCCEEDED or result not in rec.results:
        return ""
    with ctx.storage.local_copy(result_key(rec.job_id, result)) as path:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def sent_files(rec: JobRecord) -> list[str]:
    """The storage keys a DICOM destination receives: the SEG, then the measurement SR (which
    references the SEG) when the job wrote one and the request's ``send`` does not leave it out."""
    keys = [result_key(rec.job_id, "dicom-seg")]
    if "sr" in rec.results and rec.request.sends("sr"):
        keys.append(result_key(rec.job_id, "sr"))
    return keys


def _dicom_target(ctx: IoContext, pacs: PacsSettings, rec: JobRecord, name: str) -> Target:
    keys = sent_files(rec)

    def node() -> nodes.DicomwebNode | nodes.DimseNode:
        return nodes.destination(pacs, name, rec.tenant)

    def send() -> str:
        target = node()
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(ctx.storage.local_copy(key)) for key in keys]
            if isinstance(target, nodes.DicomwebNode):
                dicomweb.store(target, files, timeout=pacs.dicomweb_timeout_s)
            else:
                dimse_sender.send(target, files, calling_ae=pacs.dicom_ae_title)
        return "stored"

    def confirm() -> bool:
        """Whether every file sent arrived (an interrupted send is repeated whole otherwise)."""
        target = node()
        for key in keys:
            with ctx.storage.local_copy(key) as path:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            uids = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            if isinstance(target, nodes.DicomwebNode):
                held = dicomweb.has_instance(target, *uids, timeout=pacs.dicomweb_timeout_s)
            else:
                held = dimse_sender.has_instance(target, *uids, calling_ae=pacs.dicom_ae_title)
            if not held:
                return False
        return True

    return Target(key=f"dicom:{name}", name=name, send=send, confirm=confirm)


def _shown(entry: dict[str, Any]) -> str:
    state, detail = entry["state"], entry["detail"]
    if state == DONE:
        return detail or "sent"
    if state == FAILED:
        return detail
    if state == RETRY:
        return f"retrying: {detail}"
    return "sending"


@app.task(name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver(self: Task, job_id: str) -> str:
    ctx = get_context()
    pacs = get_pacs_settings()
    rec = ctx.store.get(job_id)
    if rec is None or rec.status not in jobs.FINISHED:
        return "nothing to do"
    ledger = Ledger(ctx.redis, job_id, ctx.settings.job_ttl_s)
    plan, skipped = targets(ctx, pacs, rec)
    waiting = 0
    for t in plan:
        entry = ledger.get(t.key)
        if entry["state"] in (DONE, FAILED):
            continue
        if entry["state"] == SENDING and t.confirm is not None:
            try:
                if t.confirm():
                    ledger.set(t.key, DONE, entry["attempts"], "stored")
                    logger.info("job %s: %s: an interrupted send had arrived; not sent again", job_id, t.key)
                    continue
            except nodes.PacsError:
                pass  # cannot tell: send again (same identity)
        attempts = int(entry["attempts"]) + 1
        ledger.set(t.key, SENDING, attempts)
        _publish(ctx, rec, ledger, plan, skipped)
        try:
            detail = t.send()
            ledger.set(t.key, DONE, attempts, detail)
        except (nodes.PacsError, nodes.UnknownNode) as exc:
            permanent = isinstance(exc, nodes.UnknownNode) or exc.permanent
            if permanent or attempts > pacs.pacs_retries:
                tries = "" if permanent else f" (after {attempts} attempts)"
                ledger.set(t.key, FAILED, attempts, f"failed: {exc}{tries}")
            else:
                ledger.set(t.key, RETRY, attempts, str(exc))
                waiting += 1
        except Exception as exc:  # a bug must not stop the other targets
            ledger.set(t.key, FAILED, attempts, f"failed: {type(exc).__name__}")
            logger.error("job %s: %s failed: %s", job_id, t.key, type(exc).__name__)
        logger.info("job %s: %s: %s", job_id, t.key, ledger.get(t.key)["state"])
    status, overall = _publish(ctx, rec, ledger, plan, skipped)
    if waiting:
        delay = backoff(ctx, pacs, max(int(ledger.get(t.key)["attempts"]) for t in plan))
        raise self.retry(countdown=delay, max_retries=None)  # bounded by each target's attempts
    url = rec.request.callback_url
    if url and ctx.redis.set(f"msam:webhook:{job_id}", "queued", nx=True, ex=ctx.settings.job_ttl_s):
        rec = ctx.store.get(job_id) or rec
        payload = webhook_payload(ctx, rec, status)
        app.send_task(WEBHOOK_TASK, args=[job_id, url, webhooks.encode(payload).decode(), uuid.uuid4().hex])
    return overall


def _publish(ctx: IoContext, rec: JobRecord, ledger: Ledger, plan: list[Target],
             skipped: dict[str, str]) -> tuple[dict[str, str], str]:
    """The job's ``destinations_status`` (name -> state) and ``delivery`` (pending/done/failed)."""
    entries = {t.key: ledger.get(t.key) for t in plan}
    shown = {**skipped, **{t.name: _shown(entries[t.key]) for t in plan}}
    states = {e["state"] for e in entries.values()}
    overall = jobs.DELIVERY_PENDING if states - {DONE, FAILED} else \
        jobs.DELIVERY_FAILED if FAILED in states or skipped else jobs.DELIVERY_DONE
    ctx.store.set_delivery(rec.job_id, shown, overall)
    return shown, overall


def webhook_payload(ctx: IoContext, rec: JobRecord, destinations: dict[str, str]) -> dict[str, Any]:
    base = _base(ctx, rec)
    results = {f: f"{base}/jobs/{rec.job_id}/result?format={f}" for f in rec.results} \
        if rec.status == jobs.SUCCEEDED else {}
    return {"event": "job.finished", "job_id": rec.job_id, "status": rec.status,
            "job_url": f"{base}/jobs/{rec.job_id}", "volume_id": rec.volume_id, "results": results,
            "destinations": destinations, "error": rec.error, "source": rec.request.source.to_json() if rec.request.source is not None else None,
            "finished_at": rec.finished_at}


@app.task(name=WEBHOOK_TASK, bind=True, acks_late=True, ignore_result=True)
def webhook(self: Task, job_id: str, url: str, body: str, delivery_id: str) -> str:
    pacs = get_pacs_settings()
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
        cap = max(1.0, get_context().settings.visibility_timeout_s / 2)
        delay = webhooks.backoff(attempt, pacs.webhook_backoff_s, cap)
        logger.info("job %s: webhook attempt %d failed (%s); retry in %.1f s", job_id, attempt, reason, delay)
        raise self.retry(countdown=delay, max_retries=pacs.webhook_retries)
    logger.warning("job %s: webhook failed after %d attempt(s) (%s)", job_id, attempt, reason)
    return "failed"
