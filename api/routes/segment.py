from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import pacs_requests, uploads
from api.deps import Services, base_url, services, tenant
from api.errors import ApiError
from api.uploads import forget_volume
from api.schemas import KEYED_RESPONSES, ErrorBody, JobAccepted, Prompts, SegmentByVolume
from msam_service import jobs
from msam_service.contract import JobRequest, PromptDocument
from msam_service.masks import grid_difference, mask_grid_error, mask_refs
from msam_service.prompts import resolve
from msam_service.inflight import InFlight
from msam_service.queue import enqueue, enqueue_retrieval

RETRY_AFTER_S = 10

router = APIRouter(tags=["jobs"], responses=KEYED_RESPONSES)

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image", "prompts"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "NIfTI, NRRD, MetaImage (.mha, or .mhd + its data file), the DICOM files of one "
                  "series, or a zip of them"},
        "masks": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "lesion masks on the image's grid, one volume per file, named by a lesion's "
                  "mask.upload"},
        "prompts": {"type": "string", "description": "JSON document, schema Prompts"},
        "series_uid": {"type": "string", "description": "SeriesInstanceUID when the upload holds several"},
        "destinations": {"type": "string", "description": "configured node names for the DICOM-SEG (JSON list or comma-separated)"},
        "callback_url": {"type": "string", "description": "webhook URL on the server's allowlist"},
        "send": {"type": "string", "description": "what the destinations receive: 'dicom-seg,sr' (default: the "
                 "SEG and the measurement SR) or 'dicom-seg'"},
    },
}


@router.post(
    "/segment", status_code=202, response_model=JobAccepted,
    responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody},
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
        body = await request.body()  # at most MSAM_MAX_JSON_KB (api.timeouts.BodyLimit)
        payload = await run_in_threadpool(SegmentByVolume.model_validate_json, body)  # off the event loop
        prompts = payload.prompts or Prompts.model_construct(space="LPS", lesions=[], iterations=1)  # the worker finds them
        routing = await run_in_threadpool(pacs_requests.route, svc, payload, who, base)
        info, volume_id, job = routing.info, routing.volume_id, routing.request
        job.lines_from_pacs = payload.lines_from_pacs
    elif ctype.startswith("multipart/form-data"):
        form = await _read_form(request, svc)
        raw = form.get("prompts")
        if not isinstance(raw, str):
            raise ApiError(422, "invalid_request", "prompts: missing; send the prompts JSON as the form field 'prompts'")
        prompts = await run_in_threadpool(_parse_prompts, raw)  # off the event loop
        files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
        series = form.get("series_uid")
        callback = form.get("callback_url")
        destinations = await run_in_threadpool(_form_destinations, form.get("destinations"))
        send = pacs_requests.form_send(form.get("send"))
        job = pacs_requests.outputs(destinations, callback if isinstance(callback, str) else None, base, who,
                                    send=send)
        check_prompt_count(svc, prompts)  # before the upload is decoded
        masks = [f for f in form.getlist("masks") if isinstance(f, UploadFile)]
        info = await uploads.ingest_upload(svc, files, series if isinstance(series, str) else None, who)
        volume_id = info.volume_id
        job.own_volume = True  # uploaded for this job alone: DELETE of the job removes it
        try:
            job.mask_volumes = await _ingest_masks(svc, prompts, masks, who)
        except Exception:
            forget_volume(svc, volume_id)  # a refused request keeps no image
            raise
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data (image + prompts) or application/json (volume_id + prompts)")
    check_prompt_count(svc, prompts)
    request.state.volume_id = volume_id
    doc = prompts.document()
    try:
        if info is not None:  # None: a PACS series the worker retrieves (it checks the prompts then)
            resolve(doc, info.geometry_volume())  # InvalidPrompt -> 422, before anything is queued
        await run_in_threadpool(_check_masks, svc, doc, info, who)
    except Exception:  # a refused request keeps no image: neither its masks nor its own upload
        for mask_id in job.mask_volumes:
            forget_volume(svc, mask_id)
        if job.own_volume:
            forget_volume(svc, volume_id)
        raise
    job_id = jobs.new_id()
    request.state.job_id = job_id
    job.prompts = doc
    await run_in_threadpool(_submit, svc, job_id, who, volume_id, job)
    return JobAccepted(job_id=job_id, status_url=f"{base}/jobs/{job_id}", volume_id=volume_id)


async def _ingest_masks(svc: Services, prompts: Prompts, files: list[UploadFile], who: str) -> list[str]:
    """Store each file of the multipart field ``masks`` as a volume and point the lesions whose
    ``mask.upload`` names it at that volume; returns the new volume ids (the job's own)."""
    wanted = {lesion.mask.upload for lesion in prompts.lesions if lesion.mask is not None and lesion.mask.upload}
    names = [f.filename or "" for f in files]
    if len(set(names)) != len(names):
        raise ApiError(422, "invalid_request", "masks: two files have the same name; name each mask file uniquely")
    missing = sorted(wanted - set(names))
    if missing:
        raise ApiError(422, "invalid_prompt", f"a lesion's mask.upload names {missing[0]!r}, but no file of that name "
                       f"came in the multipart field 'masks' (files there: {sorted(names) or 'none'})")
    unused = sorted(set(names) - wanted)
    if unused:
        raise ApiError(422, "invalid_request", f"the mask file {unused[0]!r} is named by no lesion's mask.upload; "
                       "name it in the prompts or leave it out")
    ids: dict[str, str] = {}
    try:
        for f in files:
            ids[f.filename or ""] = (await uploads.ingest_upload(svc, [f], None, who)).volume_id
    except Exception:
        for mask_id in ids.values():
            forget_volume(svc, mask_id)
        raise
    for lesion in prompts.lesions:
        if lesion.mask is not None and lesion.mask.upload:
            lesion.mask.volume_id, lesion.mask.upload = ids[lesion.mask.upload], None
    return list(ids.values())


def _check_masks(svc: Services, doc: PromptDocument, info: uploads.VolumeInfo | None, who: str) -> None:
    """Every lesion mask is a volume of this tenant (404 otherwise) on the image's grid (422 saying
    what differs; ``info`` None: a PACS series, whose grid the worker checks)."""
    for n, ref in mask_refs(doc).items():
        if not ref.get("volume_id"):
            raise ApiError(422, "invalid_prompt", f"lesion {n}: mask.upload names a file of the multipart field "
                           "'masks'; a JSON request refers to a mask uploaded with POST /volumes by mask.volume_id")
        mask = uploads.volume_for(svc, ref["volume_id"], who)
        if info is None:
            continue
        difference = grid_difference(mask.shape, mask.affine_ras, info.shape, info.affine_ras)
        if difference:
            raise mask_grid_error(n, difference)


async def _read_form(request: Request, svc: Services) -> FormData:
    """The multipart form; a text field (``prompts``, ``destinations``...) larger than
    ``MSAM_MAX_JSON_KB`` is a 413 that names the setting."""
    kb = svc.settings.max_json_kb
    try:
        return await request.form(max_files=svc.settings.max_files + 1 + svc.settings.max_lesions, max_fields=10,
                                  max_part_size=kb * 1024)
    except StarletteHTTPException as exc:
        if exc.status_code == 400 and "maximum size" in str(exc.detail):
            raise ApiError(413, "too_large", f"a form field other than 'image' exceeds {kb} KB (MSAM_MAX_JSON_KB); "
                           "send images in the field 'image' (with a file name) and keep text fields short") from exc
        raise


#: Deeper than any valid document (prompts nest 5 levels), shallow enough for every JSON parser.
MAX_JSON_DEPTH = 32
_JSON_TOKENS = re.compile(r'[\[\]{}"\\]')


def check_nesting(field: str, text: str) -> None:
    """422 for a JSON form field nested deeper than :data:`MAX_JSON_DEPTH`, before any parser
    sees it: Python's ``json`` recurses once per level and a few thousand ``[`` end in a
    ``RecursionError``. One linear pass over the brackets, quotes and backslashes."""
    depth, in_string, skip = 0, False, -1
    for m in _JSON_TOKENS.finditer(text):
        c, at = m.group(), m.start()
        if in_string:
            if at == skip:
                continue  # an escaped quote or backslash
            if c == "\\":
                skip = at + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ApiError(422, "invalid_request", f"{field}: JSON nested more than {MAX_JSON_DEPTH} levels "
                               "deep; send the documented structure")
        elif c in "]}":
            depth -= 1


def _parse_prompts(raw: str) -> Prompts:
    check_nesting("prompts", raw)
    try:
        return Prompts.model_validate_json(raw)
    except ValidationError as exc:
        bad = next((e for e in exc.errors() if e["type"] == "json_invalid"), None)
        if bad is None:
            raise
        at = next((x for x in bad["loc"] if isinstance(x, int)), None)
        raise ApiError(422, "invalid_request", "prompts: the form field is not valid JSON ("
                       f"{bad.get('ctx', {}).get('error', 'decode error')}"
                       f"{f' at character {at + 1}' if at is not None else ''}); send the prompts document as "
                       'JSON, e.g. {"space": "LPS", "lesions": [{"positive": [[x, y, z]]}]}') from exc


def _form_destinations(raw: object) -> list[str]:
    """The multipart field ``destinations`` (a JSON list or comma-separated names), nesting checked."""
    if isinstance(raw, str):
        check_nesting("destinations", raw)
    try:
        return pacs_requests.form_destinations(raw)
    except RecursionError as exc:  # the check above should make this unreachable
        raise ApiError(422, "invalid_request", "destinations: JSON nested too deeply; send a list of node "
                       'names, e.g. ["pacs1"]') from exc


def check_prompt_count(svc: Services, prompts: Prompts) -> None:
    """The request limits of the settings, the only place they are enforced (``GET /info`` reports
    the same fields): ``MSAM_MAX_LESIONS``, ``MSAM_MAX_POINTS`` (clicks of one lesion, positive
    and negative together) and ``MSAM_MAX_PROMPTS`` (points and boxes of all lesions together)."""
    limit = svc.settings
    if len(prompts.lesions) > limit.max_lesions:
        raise ApiError(422, "too_many_prompts", f"{len(prompts.lesions)} lesions in one request; at most "
                       f"{limit.max_lesions} (MSAM_MAX_LESIONS)")
    for number, lesion in enumerate(prompts.lesions, start=1):
        clicks = len(lesion.positive) + len(lesion.negative)
        if clicks > limit.max_points:
            raise ApiError(422, "too_many_prompts", f"lesion {number} has {clicks} clicks (positive and negative); "
                           f"at most {limit.max_points} per lesion (MSAM_MAX_POINTS)")
    n = sum(len(x.positive) + len(x.negative) + (x.box is not None) + (x.line is not None) for x in prompts.lesions)
    if n > limit.max_prompts:
        raise ApiError(422, "too_many_prompts", f"{n} points, boxes and lines in one request; at most "
                       f"{limit.max_prompts} (MSAM_MAX_PROMPTS)")


def _submit(svc: Services, job_id: str, who: str, volume_id: str, job: JobRequest) -> None:
    svc.store.create(job_id, tenant=who, volume_id=volume_id, request=job)
    if not InFlight(svc.redis, svc.settings.max_jobs_in_flight, svc.settings.job_ttl_s).acquire(who, job_id):
        svc.store.delete(job_id)
        if job.own_volume:
            forget_volume(svc, volume_id)
        raise ApiError(429, "too_many_jobs", f"this tenant already has {svc.settings.max_jobs_in_flight} jobs "
                       "queued or running (MSAM_MAX_JOBS_IN_FLIGHT); wait for one to finish",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    if job.source is not None and job.source.in_archive:
        enqueue_retrieval(svc.queue, job_id)  # the I/O worker retrieves, then queues the segmentation
    else:
        enqueue(svc.queue, job_id)
    svc.metrics.incr("jobs_submitted")
