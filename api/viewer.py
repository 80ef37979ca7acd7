"""The web viewer: the page at ``/``, its built assets under ``/static``, and the one
read-only route the page needs that the public API lacks: the decoded image of an uploaded
volume as NIfTI, so the browser can show DICOM / NRRD uploads (and any volume picked again
later) on exactly the grid the workers segment.

The page's source is ``viewer/`` (NiiVue, bundled with esbuild by ``make viewer``); the bundle
in ``api/static/viewer/`` is committed, so serving it needs no Node.js.
"""

from __future__ import annotations

import gzip
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api import uploads
from api.deps import Services, services, tenant
from api.errors import ApiError
from api.schemas import KEYED_RESPONSES, ErrorBody
from msam_service.volumes import VolumeInfo, open_volume

logger = logging.getLogger("msam.viewer")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = STATIC_DIR / "viewer" / "index.html"
#: the displayed image, kept beside the upload (expires and is deleted with it)
DISPLAY_NAME = "display.nii.gz"

router = APIRouter(tags=["viewer"], responses=KEYED_RESPONSES)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> Response:
    if not PAGE.is_file():
        return HTMLResponse("<p>The viewer is not built: run <code>make viewer</code>.</p>", status_code=503)
    return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})


def display_nifti(volume_array: np.ndarray, affine: np.ndarray) -> bytes:
    """The image as gzipped NIfTI-1 with ``affine`` (voxel -> RAS mm) in both sform and qform,
    the way msam writes masks for non-NIfTI inputs, so image and mask overlay exactly."""
    array = np.asarray(volume_array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=2)
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if np.allclose(axes.T @ axes, np.eye(3), atol=1e-6):
        img.set_qform(affine, code=2)
    else:
        img.set_qform(None, code=0)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"msam display"
    with tempfile.TemporaryDirectory(prefix="msam-view-") as tmp:
        path = Path(tmp) / "image.nii"
        nib.save(img, str(path))
        return gzip.compress(path.read_bytes(), compresslevel=1)


def _display_file(svc: Services, info: VolumeInfo) -> Path:
    key = f"volumes/{info.volume_id}/{DISPLAY_NAME}"
    local = getattr(svc.storage, "path", None)
    if local is None:
        raise ApiError(501, "not_implemented", "the viewer needs a local storage directory")
    if not svc.storage.exists(key):
        volume = open_volume(svc.storage, info)
        svc.storage.put_bytes(key, display_nifti(volume.array, np.asarray(volume.affine, dtype=np.float64)))
    return Path(local(key))


@router.get("/viewer/volumes/{volume_id}/image", response_class=FileResponse,
            responses={200: {"content": {"application/gzip": {}}}, 404: {"model": ErrorBody}})
async def volume_image(volume_id: str, svc: Services = Depends(services), who: str = Depends(tenant)) -> FileResponse:
    """The decoded image of an uploaded volume as NIfTI (``.nii.gz``): voxel ``(i, j, k)`` is
    the API's ``voxel`` space and the header affine is ``affine_ras`` of ``POST /volumes``."""
    if len(volume_id) != 32 or not volume_id.isalnum():
        raise ApiError(404, "not_found", f"volume {volume_id} does not exist or has expired")
    info = await run_in_threadpool(uploads.volume_for, svc, volume_id, who)
    path = await run_in_threadpool(_display_file, svc, info)
    return FileResponse(path, media_type="application/gzip", filename="image.nii.gz",
                        headers={"Cache-Control": "private, no-store"})


def install(app: FastAPI) -> None:
    """Mount the viewer on ``app`` (called by :func:`api.main.create_app`)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
