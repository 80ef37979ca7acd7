from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

from api import uploads
from api.deps import Services, multipart_body, services, tenant
from api.schemas import KEYED_RESPONSES, ErrorBody, VolumeOut
from msam_service.volumes import VolumeInfo

router = APIRouter(tags=["volumes"], responses=KEYED_RESPONSES)


@router.post("/volumes", status_code=201, response_model=VolumeOut, dependencies=[Depends(multipart_body)],
             responses={408: {"model": ErrorBody}, 413: {"model": ErrorBody},
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
    return _out(info)


def _out(info: VolumeInfo) -> VolumeOut:
    data = asdict(info)
    data.pop("input_key")
    return VolumeOut(**data)


@router.get("/volumes/{volume_id}", response_model=VolumeOut,
            responses={404: {"model": ErrorBody}})
def get_volume(volume_id: str, request: Request, svc: Services = Depends(services),
               who: str = Depends(tenant)) -> VolumeOut:
    """An uploaded volume's geometry (shape, spacing, ``affine_ras``: voxel -> RAS mm), as its
    upload answered; reading it keeps the volume from expiring."""
    request.state.volume_id = volume_id
    return _out(uploads.volume_for(svc, volume_id, who))


@router.delete("/volumes/{volume_id}", status_code=204, response_class=Response,
               responses={404: {"model": ErrorBody}})
def delete_volume(volume_id: str, request: Request, svc: Services = Depends(services),
                  who: str = Depends(tenant)) -> Response:
    """Delete an uploaded volume now instead of at its expiry: its files and its record. Jobs and
    sessions that still need it fail saying it no longer exists."""
    request.state.volume_id = volume_id
    uploads.volume_for(svc, volume_id, who)  # 404 for another tenant's or an unknown volume
    uploads.forget_volume(svc, volume_id)
    return Response(status_code=204)
