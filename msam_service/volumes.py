"""Uploaded images: stored once under ``volumes/<id>/``, validated by decoding, reopened by workers.

The gateway calls :func:`ingest` (files already streamed to a staging folder under generated
names); it decodes the image with msam_core so a bad upload is a 4xx, and records the geometry
(``meta.json``: format, shape, RAS affine, modality - never header text) so prompts can be
checked against the image without a worker. Workers call :func:`open_volume`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from msam_core.errors import InvalidVolume, MsamError
from msam_core.io.load import SUPPORTED_INPUTS
from msam_core.io.volume import Volume
from msam_service.storage import Storage
from msam_service.upload_guard import UploadLimits, check_upload

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".zip", ".dcm")


@dataclass
class VolumeInfo:
    volume_id: str
    format: str
    shape: list[int]
    spacing: list[float]
    affine_ras: list[list[float]]
    modality: str | None
    series_instance_uid: str | None
    input_key: str

    def geometry_volume(self) -> Volume:
        """A :class:`Volume` with this geometry and no pixel data (a zero-stride view), enough to
        validate prompts against the image."""
        dummy = np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(self.shape))
        return Volume(array=dummy, affine=np.asarray(self.affine_ras), modality=self.modality,
                      meta={"format": self.format})


def new_volume_id() -> str:
    return uuid.uuid4().hex


def suffix_of(client_name: str) -> str:
    """The known suffix of a client's file name ('' when none); the name itself is never used."""
    name = (client_name or "").lower()
    return next((s for s in SINGLE_FILE_SUFFIXES if name.endswith(s)), "")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def arrange_upload(staging: Path, files: list[tuple[str, Path]]) -> Path:
    """Give staged files their final names; returns the path to decode (a file or a folder).

    ``files`` are ``(client file name, staged path)``. One NIfTI/NRRD/MetaImage/zip/DICOM file
    is used as is; a MetaImage header (``.mhd``) with its data file becomes one ``.mha``
    (:func:`~msam_core.io.metaimage.join_metaimage`: the header must name the other file); any
    other several files must be the DICOM files of one series.
    """
    if not files:
        raise InvalidVolume(f"no image file uploaded; send one of: {SUPPORTED_INPUTS}")
    if len(files) == 1:
        name, path = files[0]
        suffix = suffix_of(name) or (".dcm" if _looks_like_dicom(path) else "")
        if suffix in (".nii", ".nii.gz"):  # readers go by the suffix: let it say what the bytes are
            suffix = ".nii.gz" if _is_gzip(path) else ".nii"
        if not suffix:
            raise InvalidVolume(f"uploaded file has an unknown format (by name and content); send one of: {SUPPORTED_INPUTS}")
        final = staging / f"image{suffix}"
        os.replace(path, final)
        return final
    if any(suffix_of(name) in (".mhd", ".mha") for name, _ in files):
        from msam_core.io.metaimage import join_metaimage

        return join_metaimage(files, staging / "image.mha")
    folder = staging / "series"
    folder.mkdir()
    for n, (name, path) in enumerate(files):
        suffix = suffix_of(name)
        if suffix in (".nii.gz", ".nii", ".nrrd", ".zip"):
            raise InvalidVolume(
                f"{len(files)} files uploaded, one of them {suffix}: send one NIfTI/NRRD/MetaImage/zip file, "
                "a MetaImage .mhd with its data file, or the DICOM files of one series")
        os.replace(path, folder / f"{n:06d}.dcm")
    return folder


#: An absolute file path (``/a/b``, ``/a/b/c.nii``) not glued to a word: "NIfTI/NRRD" is no path.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/])/(?:[\w.+-]+/)*[\w.+-]+")


def without_paths(message: str) -> str:
    """``message`` with absolute paths replaced by ``<file>``: decoders quote the files they were
    given, and those are server paths (storage, staging) that clients must not learn."""
    return _ABSOLUTE_PATH.sub("<file>", message)


def decode(path: Path, series_uid: str | None = None) -> Volume:
    """Read an arranged upload; every failure is an :class:`InvalidVolume` (never a crash) whose
    message names no server path."""
    from msam_core.io.load import load_volume, volume_format

    try:
        return load_volume(path, series_uid=series_uid if series_uid and volume_format(path) == "dicom" else None)
    except MsamError as exc:
        message = without_paths(str(exc))
        if message == str(exc):
            raise
        raise type(exc)(message) from exc
    except (MemoryError, OSError) as exc:
        raise InvalidVolume(f"the image could not be read ({type(exc).__name__}); is it complete?") from exc
    except Exception as exc:  # decoders raise anything on hostile input
        logger.warning("decoder failure on upload: %s", type(exc).__name__)
        raise InvalidVolume(f"the image could not be decoded ({type(exc).__name__}); "
                            f"send one of: {SUPPORTED_INPUTS}") from exc


def store_input(storage: Storage, volume_id: str, arranged: Path) -> str:
    """Copy an arranged upload (one file, or a folder of DICOM files) into the volume's
    ``input/`` in storage; returns its storage key."""
    input_key = f"volumes/{volume_id}/input/{arranged.name}"
    if arranged.is_dir():
        for f in sorted(arranged.iterdir()):
            storage.put_file(f"{input_key}/{f.name}", f)
    else:
        storage.put_file(input_key, arranged)
    return input_key


def info_of(volume: Volume, volume_id: str, input_key: str) -> VolumeInfo:
    series = volume.meta.get("series_instance_uid") if volume.meta.get("format") == "dicom" else None
    return VolumeInfo(
        volume_id=volume_id, format=str(volume.meta.get("format", "unknown")),
        shape=list(volume.shape), spacing=[round(float(s), 6) for s in volume.spacing],
        affine_ras=np.asarray(volume.affine).round(6).tolist(), modality=volume.modality,
        series_instance_uid=series, input_key=input_key)


def ingest(storage: Storage, staging: Path, files: list[tuple[str, Path]],
           series_uid: str | None = None, limits: UploadLimits | None = None) -> tuple[VolumeInfo, Volume]:
    """Validate and store an upload; returns its info and the decoded volume. With ``limits``,
    headers are checked (and a zip extracted) before any pixel data is decoded."""
    arranged = arrange_upload(staging, files)
    if limits is not None:
        arranged = check_upload(arranged, staging, limits)
    volume = decode(arranged, series_uid)
    volume_id = new_volume_id()
    input_key = store_input(storage, volume_id, arranged)
    if volume.meta.get("format") == "dicom":
        series_uid = str(volume.meta.get("series_instance_uid"))
    info = info_of(volume, volume_id, input_key)
    info.series_instance_uid = series_uid if volume.meta.get("format") == "dicom" else None
    storage.put_bytes(f"volumes/{volume_id}/meta.json", json.dumps(asdict(info)).encode())
    return info, volume


def load_info(storage: Storage, volume_id: str) -> VolumeInfo | None:
    key = f"volumes/{volume_id}/meta.json"
    try:
        return VolumeInfo(**json.loads(storage.get_bytes(key)))
    except (FileNotFoundError, ValueError):
        return None


def open_volume(storage: Storage, info: VolumeInfo) -> Volume:
    storage.touch(f"volumes/{info.volume_id}")
    with storage.local_copy(info.input_key) as path:
        return decode(path, info.series_instance_uid)
