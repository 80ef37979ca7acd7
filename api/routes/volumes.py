from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from api import uploads
from api.deps import Services, multipart_body, services, tenant
from api.schemas import ErrorBody, VolumeOut

router = APIRouter(tags=["volumes"])


@router.post("/volumes", status_code=201, response_model=VolumeOut, dependencies=[Depends(multipart_body)],
             responses={401: {"model": ErrorBody}, 408: {"model": ErrorBody}, 413: {"model": ErrorBody},
                        415: {"model": ErrorBody}, 422: {"model": ErrorBody}})
async def upload_volume(
    request: Request,
    image: list[UploadFile] = File(description="NIfTI, NRRD, the DICOM files of one series, or a zip of them"),
    series_uid: str | None = Form(default=None, description="SeriesInstanceUID when the upload holds several"),
    svc: Services = Depends(services),
    who: str = Depends(tenant),
) -> VolumeOut:
    """Upload an image once; segment it any number of times with ``POST /segment`` (JSON)."""
    info = await uploads.ingest_upload(svc, image, series_uid, who)
    request.state.volume_id = info.volume_id  # for the audit line
    data = asdict(info)
    data.pop("input_key")
    return VolumeOut(**data)
