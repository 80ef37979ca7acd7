"""One entry point that turns a path into a :class:`~msam_core.io.volume.Volume`.

Formats are chosen by name: ``.nii`` / ``.nii.gz`` (NIfTI), ``.nrrd`` / ``.nhdr`` (NRRD),
``.mha`` / ``.mhd`` (MetaImage, through SimpleITK), a folder, ``.zip`` or ``.dcm`` (a DICOM series, read by :mod:`msam_core.io.dicom`). Every failure a
user can cause is an :class:`~msam_core.errors.InvalidVolume` or
:class:`~msam_core.errors.UnsupportedRequest` whose message names the file, never its contents.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from msam_core.errors import InvalidVolume, UnsupportedRequest
from msam_core.io.volume import Volume

SUPPORTED_INPUTS = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, or .mhd with its .raw/.zraw), "
                    "DICOM series (folder, .zip, .dcm)")


def volume_format(path: str | Path) -> str:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``"dicom"`` for a path, judged by its name (and folder-ness)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir() or name.endswith((".zip", ".dcm")):
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "metaimage"
    raise InvalidVolume(f"{path.name}: unknown image format; supported inputs: {SUPPORTED_INPUTS}")


def read_dicom_series(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read a DICOM series through :func:`msam_core.io.dicom.read_series` when it is installed
    (``series_uid``: the one to read where the input holds several)."""
    try:
        dicom = importlib.import_module("msam_core.io.dicom")
        read_series = dicom.read_series
    except (ImportError, AttributeError) as exc:
        raise UnsupportedRequest(
            "DICOM input needs the DICOM reader (msam_core.io.dicom.read_series), which this "
            "build does not include yet; convert the series to NIfTI or NRRD first"
        ) from exc
    return read_series(path, series_uid=series_uid)


def load_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read any supported image into a :class:`Volume` whose affine maps voxels to RAS mm
    (non-finite voxels as :func:`finite_volume` sets them). ``series_uid``: for DICOM input
    holding several image series, the SeriesInstanceUID of the one to read."""
    path = Path(path)
    if not path.exists():
        raise InvalidVolume(f"{path}: no such file or folder")
    kind = volume_format(path)
    if series_uid is not None and kind != "dicom":
        raise InvalidVolume(f"{path.name} is {kind}, not DICOM: a series UID chooses among DICOM series only")
    if kind == "nifti":
        from msam_core.io.nifti import read_nifti

        return finite_volume(read_nifti(path), path.name)
    if kind == "nrrd":
        from msam_core.io.nrrd import read_nrrd

        return finite_volume(read_nrrd(path), path.name)
    if kind == "metaimage":
        from msam_core.io.metaimage import read_metaimage

        return finite_volume(read_metaimage(path), path.name)
    return read_dicom_series(path, series_uid)  # integer pixel data: always finite


def finite_volume(volume: Volume, name: str) -> Volume:
    """``volume`` with its non-finite voxels (NaN, +-inf: some tools write NaN outside the field
    of view or a brain mask) set to its lowest finite value, the background, so that one NaN does
    not turn every crop's normalisation into NaN; how many is kept in ``meta["non_finite_voxels"]``
    (0 too), so a volume read this way once (by :func:`load_volume`, then by the pipeline's
    sampler) is scanned once. An image without a finite voxel is refused."""
    array = volume.array
    if array.dtype.kind != "f" or "non_finite_voxels" in volume.meta:
        return volume
    finite = np.isfinite(array)
    if finite.all():
        return Volume(array, volume.affine, volume.modality, {**volume.meta, "non_finite_voxels": 0})
    if not finite.any():
        raise InvalidVolume(f"{name}: every voxel is NaN or infinite; the image holds no values to segment")
    filled = np.where(finite, array, array[finite].min()).astype(array.dtype, copy=False)
    return Volume(filled, volume.affine, volume.modality,
                  {**volume.meta, "non_finite_voxels": int(finite.size - np.count_nonzero(finite))})
