"""Uploads: stream files to staging (size-checked), decode and store them as a volume.

Client file names are only used for their suffix (format detection) and, for a MetaImage pair,
compared with the name its header gives the data file; never as paths.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile  # FastAPI's UploadFile subclasses it

from api.deps import Services
from api.errors import ApiError
from msam_service.lifecycle import volume_owner_key
from msam_service.upload_guard import UploadLimits
from msam_service.volumes import VolumeInfo, ingest, load_info

_CHUNK = 1 << 20


__all__ = ["forget_volume", "ingest_upload", "volume_for", "volume_owner_key"]


def _copy(files: Sequence[UploadFile], staging: Path, limit: int) -> list[tuple[str, Path]]:
    total = 0
    staged = []
    for n, upload in enumerate(files):
        dst = staging / f"upload{n:06d}"
        with open(dst, "wb") as out:
            while chunk := upload.file.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, "too_large", f"the upload exceeds {limit // 2**20} MB (MSAM_MAX_UPLOAD_MB)")
                out.write(chunk)
        if dst.stat().st_size == 0:
            raise ApiError(422, "invalid_volume", f"uploaded file #{n + 1} is empty")
        staged.append((upload.filename or "", dst))
    return staged


async def ingest_upload(svc: Services, files: Sequence[UploadFile], series_uid: str | None, tenant: str) -> VolumeInfo:
    settings = svc.settings
    if not files:
        raise ApiError(422, "invalid_volume", "no image uploaded: send the file(s) in the multipart field 'image'")
    if len(files) > settings.max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files uploaded; at most {settings.max_files} (MSAM_MAX_FILES)")
    staging = svc.storage.staging_dir()
    try:
        staged = await run_in_threadpool(_copy, files, staging, settings.max_upload_mb * 2**20)
        info, _ = await run_in_threadpool(ingest, svc.storage, staging, staged, series_uid or None,
                                          UploadLimits.from_settings(settings))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    svc.redis.set(volume_owner_key(info.volume_id), tenant, ex=settings.job_ttl_s)
    return info


def volume_for(svc: Services, volume_id: str, tenant: str) -> VolumeInfo:
    """The tenant's volume, or 404 (also for another tenant's volume)."""
    owner = svc.redis.get(volume_owner_key(volume_id))
    info = load_info(svc.storage, volume_id) if owner is not None and owner.decode() == tenant else None  # type: ignore[union-attr]
    if info is None:
        raise ApiError(404, "not_found", f"volume {volume_id} does not exist, was deleted or has expired; upload it again")
    svc.redis.expire(volume_owner_key(volume_id), svc.settings.job_ttl_s)
    svc.storage.touch(f"volumes/{volume_id}")
    return info


def forget_volume(svc: Services, volume_id: str) -> None:
    """Delete an uploaded volume's files and its owner record."""
    svc.storage.delete_prefix(f"volumes/{volume_id}")
    svc.redis.delete(volume_owner_key(volume_id))
