from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import pacs_requests, uploads
from api.deps import Services, base_url, services, tenant
from api.errors import ApiError
from api.uploads import forget_volume
from api.schemas import ErrorBody, JobAccepted, Prompts, SegmentByVolume
from msam_service import jobs
from msam_service.prompts import resolve
from msam_service.inflight import InFlight
from msam_service.queue import enqueue

RETRY_AFTER_S = 10

router = APIRouter(tags=["jobs"])

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image", "prompts"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "NIfTI, NRRD, the DICOM files of one series, or a zip of them"},
        "prompts": {"type": "string", "description": "JSON document, schema Prompts"},
        "series_uid": {"type": "string", "description": "SeriesInstanceUID when the upload holds several"},
        "destinations": {"type": "string", "description": "configured node names for the DICOM-SEG (JSON list or comma-separated)"},
        "callback_url": {"type": "string", "description": "webhook URL on the server's allowlist"},
    },
}


@router.post(
    "/segment", status_code=202, response_model=JobAccepted,
    responses={400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 404: {"model": ErrorBody},
               408: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody},
               422: {"model": ErrorBody}, 429: {"model": ErrorBody}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        "application/json": {"schema": {"$ref": "#/components/schemas/SegmentByVolume"}}}}},
)
async def segment(request: Request, svc: Services = Depends(services), who: str = Depends(tenant),
                  base: str = Depends(base_url)) -> JobAccepted:
    """Queue a segmentation: multipart (image files + ``prompts`` JSON) or JSON
    (``volume_id`` from ``POST /volumes``, or ``source``: a PACS series, + ``prompts``). Poll
    ``status_url``; optional ``destinations`` (DICOM-SEG to PACS nodes) and ``callback_url``."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("application/json"):
        payload = SegmentByVolume.model_validate_json(await request.body())
        prompts = payload.prompts
        routing = await run_in_threadpool(pacs_requests.route, svc, payload, who, base)
        info, volume_id, extra = routing.info, routing.volume_id, routing.extra
    elif ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=svc.settings.max_files + 1, max_fields=10)
        raw = form.get("prompts")
        if not isinstance(raw, str):
            raise ApiError(422, "invalid_request", "prompts: missing; send the prompts JSON as the form field 'prompts'")
        prompts = Prompts.model_validate_json(raw)
        files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
        series = form.get("series_uid")
        callback = form.get("callback_url")
        extra = pacs_requests.outputs(pacs_requests.form_destinations(form.get("destinations")),
                                      callback if isinstance(callback, str) else None, base)
        check_prompt_count(svc, prompts)  # before the upload is decoded
        info = await uploads.ingest_upload(svc, files, series if isinstance(series, str) else None, who)
        volume_id = info.volume_id
        extra["own_volume"] = True  # uploaded for this job alone: DELETE of the job removes it
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data (image + prompts) or application/json (volume_id + prompts)")
    check_prompt_count(svc, prompts)
    request.state.volume_id = volume_id
    doc = prompts.model_dump()
    if info is not None:  # None: a PACS series the worker retrieves (it checks the prompts then)
        resolve(doc, info.geometry_volume())  # InvalidPrompt -> 422, before anything is queued
    job_id = jobs.new_id()
    request.state.job_id = job_id
    await run_in_threadpool(_submit, svc, job_id, who, volume_id, doc, extra)
    return JobAccepted(job_id=job_id, status_url=f"{base}/jobs/{job_id}", volume_id=volume_id)


def check_prompt_count(svc: Services, prompts: Prompts) -> None:
    """``MSAM_MAX_LESIONS`` and ``MSAM_MAX_PROMPTS`` (points and boxes of all lesions together)."""
    limit = svc.settings
    if len(prompts.lesions) > limit.max_lesions:
        raise ApiError(422, "too_many_prompts", f"{len(prompts.lesions)} lesions in one request; at most "
                       f"{limit.max_lesions} (MSAM_MAX_LESIONS)")
    n = sum(len(x.positive) + len(x.negative) + (x.box is not None) for x in prompts.lesions)
    if n > limit.max_prompts:
        raise ApiError(422, "too_many_prompts", f"{n} points and boxes in one request; at most "
                       f"{limit.max_prompts} (MSAM_MAX_PROMPTS)")


def _submit(svc: Services, job_id: str, who: str, volume_id: str, doc: dict, extra: dict | None = None) -> None:
    svc.store.create(job_id, tenant=who, volume_id=volume_id, request={"prompts": doc, **(extra or {})})
    if not InFlight(svc.redis, svc.settings.max_jobs_in_flight, svc.settings.job_ttl_s).acquire(who, job_id):
        svc.store.delete(job_id)
        if (extra or {}).get("own_volume"):
            forget_volume(svc, volume_id)
        raise ApiError(429, "too_many_jobs", f"this tenant already has {svc.settings.max_jobs_in_flight} jobs "
                       "queued or running (MSAM_MAX_JOBS_IN_FLIGHT); wait for one to finish",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    enqueue(svc.queue, job_id)
    svc.metrics.incr("jobs_submitted")
