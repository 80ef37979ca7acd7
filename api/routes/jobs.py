from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import Services, base_url, services, tenant
from api.errors import ApiError
from api.uploads import forget_volume
from api.schemas import (KEYED_RESPONSES, ErrorBody, ErrorInfo, IntensityOut, JobOut, LesionSummary, ModelOut, ResultFormat,
                         Timings)
from msam_service import jobs
from msam_service.contract import RESULT_FILES, result_key
from msam_service.jobs import JobRecord
from msam_service.ris.results import fhir_bundle

router = APIRouter(tags=["jobs"], responses=KEYED_RESPONSES)



def _job(svc: Services, job_id: str, who: str) -> JobRecord:
    rec = svc.store.get(job_id) if len(job_id) == 32 and job_id.isalnum() else None
    if rec is None or rec.tenant != who:
        raise ApiError(404, "not_found", f"job {job_id} does not exist or has expired")
    return rec


def _view(svc: Services, rec: JobRecord, base: str) -> JobOut:
    return JobOut(
        job_id=rec.job_id, status=rec.status, stage=rec.stage, progress=rec.progress,  # type: ignore[arg-type]
        queue_position=svc.store.queue_position(rec.job_id) if rec.status == jobs.QUEUED else None,
        volume_id=rec.volume_id, created_at=rec.created_at, started_at=rec.started_at,
        finished_at=rec.finished_at, attempts=rec.deliveries, timings=Timings(**rec.timings),
        cache_hits=rec.cache_hits, encoder_runs=rec.encoder_runs,
        lesions=[LesionSummary(**x) for x in rec.lesions],
        results={f: f"{base}/jobs/{rec.job_id}/result?format={f}" for f in rec.results}
        if rec.status == jobs.SUCCEEDED else {},
        unavailable_results=rec.result_errors if rec.status == jobs.SUCCEEDED else {},
        warnings=rec.warnings if rec.status == jobs.SUCCEEDED else [],
        error=ErrorInfo(**rec.error) if rec.error else None,
        destinations=_destinations(rec),
        delivery=_delivery(rec),  # type: ignore[arg-type]
        model=ModelOut(**rec.model) if rec.model else None,
        intensity=IntensityOut(**rec.intensity) if rec.intensity else None,
    )


def _destinations(rec: JobRecord) -> dict[str, str]:
    """Outcome per PACS destination, ``ris:NAME`` and ``fhir:NAME`` (written by the I/O worker,
    worker/io_tasks.py)."""
    return rec.destinations_status if rec.request.needs_delivery else {}


def _delivery(rec: JobRecord) -> str | None:
    """pending / done / failed once the I/O worker has started the job's deliveries."""
    if not rec.request.needs_delivery:
        return None
    if rec.delivery:
        return rec.delivery
    return jobs.DELIVERY_PENDING if rec.status in jobs.FINISHED else None


@router.get("/jobs/{job_id}", response_model=JobOut, responses={404: {"model": ErrorBody}})
def get_job(job_id: str, svc: Services = Depends(services), who: str = Depends(tenant),
            base: str = Depends(base_url)) -> JobOut:
    """Status, progress, queue position, stage timings, result links or the error."""
    return _view(svc, _job(svc, job_id, who), base)


@router.get("/jobs/{job_id}/result", response_class=FileResponse,
            response_model=None,
            responses={200: {"content": {"application/dicom": {}, "application/gzip": {}, "image/png": {},
                                         "application/octet-stream": {}, "application/fhir+json": {}}},
                       404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}})
def get_result(job_id: str, format: ResultFormat | None = Query(
                   default=None, description="default: dicom-seg for DICOM input, else nifti"),
               svc: Services = Depends(services), who: str = Depends(tenant)) -> Response:
    """Download a result: ``dicom-seg``, ``rtstruct``, ``sr`` (the lesions' measurements as a
    TID 1500 Comprehensive 3D SR referencing the DICOM-SEG; DICOM input only), ``mha``
    (MetaImage input only), ``nifti``, ``png``; ``fhir``: a FHIR R4 Bundle, the DiagnosticReport
    with one Observation per lesion."""
    rec = _job(svc, job_id, who)
    if rec.status != jobs.SUCCEEDED:
        what = {jobs.QUEUED: "is queued", jobs.RUNNING: "is running"}.get(rec.status, f"has {rec.status}")
        raise ApiError(409, "not_ready", f"job {job_id} {what}; results exist once it has succeeded")
    fmt = format or ("dicom-seg" if rec.input_format == "dicom" or "dicom-seg" in rec.results else "nifti")
    if fmt == "fhir":  # DiagnosticReport + one Observation per lesion, as a FHIR Bundle
        bundle = fhir_bundle(rec, svc.storage, rec.request.base(svc.settings.public_url))
        return JSONResponse(bundle, media_type="application/fhir+json")
    if fmt not in rec.results:
        why = rec.result_errors.get(fmt) or (
            f"mha (MetaImage) is written for MetaImage input, and this job's input was "
            f"{rec.input_format or 'another format'}" if fmt == "mha" else f"{fmt} was not produced for this job")
        available = ", ".join(sorted(rec.results)) or "none"
        raise ApiError(422, "unsupported_request", f"{why}; this job has: {available}")
    media, download = RESULT_FILES[fmt].media_type, RESULT_FILES[fmt].download
    key = result_key(job_id, fmt)
    if not svc.storage.exists(key):
        raise ApiError(404, "not_found", f"the {fmt} result of job {job_id} has expired")
    local = getattr(svc.storage, "path", None)  # LocalStorage: send the file itself
    if local is not None:
        return FileResponse(local(key), media_type=media, filename=download)
    return Response(svc.storage.get_bytes(key), media_type=media,  # another Storage (object store)
                    headers={"Content-Disposition": f'attachment; filename="{download}"'})


@router.delete("/jobs/{job_id}", status_code=202, response_model=JobOut,
               responses={204: {"description": "finished job and its files deleted"},
                          404: {"model": ErrorBody}})
async def delete_job(job_id: str, svc: Services = Depends(services), who: str = Depends(tenant),
                     base: str = Depends(base_url)) -> JobOut | Response:
    """Cancel a queued or running job (202, status ``canceled``); delete a finished one (204)."""
    rec = await run_in_threadpool(_job, svc, job_id, who)
    if rec.status in jobs.FINISHED:
        await run_in_threadpool(_forget, svc, job_id)
        return Response(status_code=204)
    old = await run_in_threadpool(svc.store.transition, job_id, jobs.CANCELED, (jobs.QUEUED, jobs.RUNNING),
                                  cancel_requested=True, finished_at=time.time(), stage="canceled")
    if old is not None:
        svc.metrics.incr("jobs_canceled")
        if old == jobs.QUEUED:
            svc.queue.control.revoke(job_id)  # the worker also skips it by its status
    rec = await run_in_threadpool(_job, svc, job_id, who)
    return _view(svc, rec, base)


def _forget(svc: Services, job_id: str) -> None:
    """Every file of the job: its results, and its image and lesion masks when they were uploaded
    with the job."""
    rec = svc.store.get(job_id)
    svc.storage.delete_prefix(f"jobs/{job_id}")
    if rec is not None and rec.request.own_volume and rec.volume_id:
        forget_volume(svc, rec.volume_id)
    for mask_id in rec.request.mask_volumes if rec is not None else []:
        forget_volume(svc, mask_id)  # lesion masks uploaded with the job
    svc.store.delete(job_id)
