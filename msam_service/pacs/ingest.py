"""A series retrieved by WADO-RS or received by C-STORE -> a stored volume.

The same validation and storage as an upload (:mod:`msam_service.volumes`), with the volume id
chosen by the caller (the API reserves it when it accepts a PACS job, so the job, its links and
follow-up clicks can name the volume before the worker has fetched it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from msam_core.io.volume import Volume
from msam_service.storage import Storage
from msam_service.volumes import VolumeInfo, arrange_upload, decode, info_of, store_input

#: Redis key of a volume's owner (the same key the gateway sets for uploads, api/uploads.py).
VOLUME_OWNER_KEY = "msam:volume:{}"


def ingest_series(storage: Storage, staging: Path, files: list[Path], volume_id: str,
                  series_uid: str | None = None) -> tuple[VolumeInfo, Volume]:
    """Decode the DICOM ``files`` (inside ``staging``) and store them as ``volumes/<volume_id>``.
    Raises :class:`~msam_core.errors.InvalidVolume` with the reader's message."""
    arranged = arrange_upload(staging, [(f"{n:06d}.dcm", p) for n, p in enumerate(files)])
    volume = decode(arranged, series_uid)
    input_key = store_input(storage, volume_id, arranged)
    info = info_of(volume, volume_id, input_key)
    storage.put_bytes(f"volumes/{volume_id}/meta.json", json.dumps(asdict(info)).encode())
    return info, volume
