"""Read a DICOM image series into a :class:`~msam_core.io.volume.Volume`.

This module is the one place where DICOM's patient coordinate system (**LPS**: +x towards the
patient's Left, +y Posterior, +z Superior) is converted to the **RAS** affine every
:class:`Volume` carries. Everything downstream works in RAS; the DICOM writers
(:mod:`msam_core.io.seg`, :mod:`msam_core.io.rtstruct`) convert back via
:func:`volume_affine_lps`.

Array layout of the returned volume (the natural DICOM order, not resampled or reoriented):

- ``array[i, j, k]`` is column ``i``, row ``j`` of the ``k``-th slice,
- slices are sorted by their position along the slice normal ``n = row_dir x col_dir``
  (never by file name or InstanceNumber), so ``k`` grows along ``+n``,
- ``affine`` maps ``(i, j, k, 1)`` to RAS mm; in LPS, column ``i`` steps ``PixelSpacing[1]`` along
  the row direction (ImageOrientationPatient[0:3]), ``j`` steps ``PixelSpacing[0]`` along the
  column direction (ImageOrientationPatient[3:6]), and ``k`` steps the slice spacing along ``n``.

``Volume.meta`` gets non-PHI facts (``format``, UIDs, modality, SOP instance UIDs in slice order)
plus one key, ``"dicom_source"``, holding a :class:`DicomSource`: the source headers (without pixel
data) that the writers copy patient/study attributes from. Those headers *are* patient data: never
log or serialise ``meta["dicom_source"]`` (its ``repr`` is deliberately PHI-free).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from msam_core.errors import InvalidVolume
from msam_core.io.dicom_zip import DEFAULT_ZIP_LIMITS, ZipLimits, extract_zip
from msam_core.io.volume import LPS_TO_RAS, Volume

__all__ = [
    "DicomSource",
    "SeriesInfo",
    "SliceRef",
    "inflate_deflated",
    "list_series",
    "read_series",
    "volume_affine_lps",
]

logger = logging.getLogger(__name__)

_PathInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

#: SOP classes that carry pixel data but are not images to segment (or not images at all).
_NOT_SEGMENTABLE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
    "1.2.840.10008.1.3.10": "Media Storage Directory (DICOMDIR)",
}
_ORIENTATION_TOL = 1e-3  # max abs difference between direction cosines
_TILT_TOL_DEG = 0.05  # max angle between the slice stacking direction and the slice normal
_SPACING_RTOL = 0.01  # max relative deviation of a slice gap from the median gap
_POSITION_EPS_MM = 1e-3  # slices closer than this along the normal share a position


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in an upload (for choosing among several). Contains no patient data."""

    series_instance_uid: str
    description: str
    modality: str
    image_count: int

    def describe(self) -> str:
        """UID, modality and image count: what error messages list. Free-text attributes (the
        SeriesDescription) stay out, since messages reach clients and logs."""
        return f"{self.series_instance_uid} ({self.modality or '?'}, {self.image_count} image(s))"


@dataclass(frozen=True)
class SliceRef:
    """Where slice ``k`` of a volume comes from."""

    sop_instance_uid: str
    sop_class_uid: str
    #: index into :attr:`DicomSource.datasets`
    dataset_index: int
    #: 1-based frame number within a multi-frame instance, ``None`` for single-frame instances
    frame_number: int | None


@dataclass(frozen=True, repr=False)
class DicomSource:
    """The source headers a DICOM writer needs. Holds patient data: never log or serialise it.

    Attributes:
        datasets: headers of the source instances (Pixel Data removed), in slice order for
            single-frame series.
        slices: one :class:`SliceRef` per volume slice ``k``.
    """

    datasets: tuple[Dataset, ...]
    slices: tuple[SliceRef, ...]

    @property
    def multiframe(self) -> bool:
        return any(s.frame_number is not None for s in self.slices)

    def __repr__(self) -> str:  # PHI-free on purpose
        kind = "multi-frame" if self.multiframe else "single-frame"
        return f"DicomSource({len(self.datasets)} {kind} instance(s), {len(self.slices)} slice(s))"


@dataclass
class _Frame:
    """One 2D image (a single-frame instance or one frame of a multi-frame instance)."""

    path: Path
    header_index: int
    frame_number: int | None
    position: np.ndarray  # LPS mm of the centre of the first transmitted pixel
    orientation: np.ndarray  # row direction cosines (3) then column direction cosines (3), LPS
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    rows: int
    columns: int
    slope: float
    intercept: float


@dataclass
class _Series:
    uid: str
    description: str = ""
    modality: str = ""
    headers: list[tuple[Path, Dataset]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# public API


def read_series(
    path: _PathInput,
    series_uid: str | None = None,
    *,
    zip_limits: ZipLimits = DEFAULT_ZIP_LIMITS,
) -> Volume:
    """Read one DICOM image series into a RAS :class:`Volume`.

    Args:
        path: a folder (searched recursively), a ``.zip`` file, a single DICOM file (e.g. one
            multi-frame instance) or a list of DICOM files.
        series_uid: the SeriesInstanceUID to read; required when the input holds several image
            series.
        zip_limits: bounds on what a zip may expand to (see :class:`ZipLimits`).

    Raises:
        InvalidVolume: no readable image series; several series and none chosen; gantry tilt;
            missing slices or uneven spacing; mixed orientations or sizes; undecodable pixel data.
    """
    with _materialised(path, zip_limits) as files:
        series, skipped = _scan(files)
        chosen = _choose(series, skipped, series_uid)
        return _read(chosen)


def list_series(
    path: _PathInput,
    *,
    zip_limits: ZipLimits = DEFAULT_ZIP_LIMITS,
) -> list[SeriesInfo]:
    """The image series in ``path`` (folder, zip, file or list of files), largest first."""
    with _materialised(path, zip_limits) as files:
        series, _ = _scan(files)
    return sorted((_info(s) for s in series.values()), key=lambda s: -s.image_count)


def inflate_deflated(src: Path, dst: Path, max_bytes: int, max_ratio: float = DEFAULT_ZIP_LIMITS.max_ratio,
                     ratio_min_bytes: int = DEFAULT_ZIP_LIMITS.ratio_min_bytes) -> bool:
    """Rewrite a file in Deflated Explicit VR Little Endian as Explicit VR Little Endian,
    expanding at most ``max_bytes`` and at most ``max_ratio`` times the file's size (the zip
    rule, so only outputs above ``ratio_min_bytes`` are held to it); returns False (``dst`` not
    written) for any other file.

    pydicom inflates such a file completely in memory before reading a single element (even
    with ``stop_before_pixels``), so a few kilobytes could expand to gigabytes. The file meta
    is kept except for its transfer syntax; the dataset bytes are the inflated stream as is
    (PS3.5 A.5: deflate is applied to the Explicit VR Little Endian encoding).

    Raises:
        InvalidVolume: the inflated dataset exceeds ``max_bytes``, or the data is corrupt.
    """
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    if not _has_dicom_preamble(src):
        return False
    try:
        meta = pydicom.filereader.read_file_meta_info(src)
    except Exception:  # noqa: BLE001 - not our case; the reader reports unreadable files
        return False
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return False
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        raise InvalidVolume("a deflated DICOM file has no File Meta Information Group Length; re-send it "
                            "uncompressed or with another transfer syntax")
    from msam_core.io.bounded import decompress_to

    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(132 + 12 + int(group_length))  # preamble + "DICM", (0002,0000) UL element, the rest of group 2
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
        by_ratio = max(int(max_ratio * src.stat().st_size), ratio_min_bytes)
        written, _ = decompress_to(f, out, "deflate", min(max_bytes, by_ratio) + 1, "a deflated DICOM file")
    if written > max_bytes:
        raise InvalidVolume(f"a deflated DICOM file expands to more than {max_bytes // 2**20} MB "
                            "(MSAM_MAX_DECOMPRESSED_MB)")
    if written > by_ratio:
        raise InvalidVolume(f"a deflated DICOM file expands more than {max_ratio:g} times (a decompression "
                            "bomb?); send it uncompressed or in another transfer syntax")
    return True


def volume_affine_lps(volume: Volume) -> np.ndarray:
    """The volume's affine to **LPS** mm (DICOM patient coordinates) instead of RAS."""
    affine: np.ndarray = LPS_TO_RAS @ volume.affine
    return affine


# ---------------------------------------------------------------------------------------------
# inputs


class _materialised:
    """Context manager: the input as a list of local files (a zip is extracted to a temp dir)."""

    def __init__(self, path: _PathInput, limits: ZipLimits) -> None:
        self._path = path
        self._limits = limits
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> list[Path]:
        p = self._path
        if isinstance(p, (str, os.PathLike)):
            p = Path(p)
            if p.is_dir():
                return sorted(_walk(p))
            if not p.is_file():
                raise InvalidVolume(f"no such file or folder: {p.name!r}")
            if not _has_dicom_preamble(p) and zipfile.is_zipfile(p):
                self._tmp = tempfile.TemporaryDirectory(prefix="msam-dicom-")
                return extract_zip(p, self._tmp.name, self._limits)
            return [p]
        files = [Path(x) for x in p]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidVolume(f"{len(missing)} of the given DICOM files do not exist (e.g. {missing[0]!r})")
        return files

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            f = Path(dirpath) / name
            if f.is_file() and not f.is_symlink():
                yield f


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file without Pixel Data, or ``None`` if it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception:  # noqa: BLE001 - a corrupt file is simply not a usable DICOM file
        return None
    try:  # files without the 128-byte preamble / file meta (old but legal in practice)
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001
        return None
    return ds if "SOPClassUID" in ds and "SeriesInstanceUID" in ds else None


def _same_image(first: Path, other: Path) -> bool:
    """Whether two files that carry one SOPInstanceUID hold the same image: the same bytes (a
    file sent twice), or the same decoded pixels (the same image written twice, e.g. in another
    transfer syntax). Only duplicates are compared, so a series sent once costs nothing."""
    import filecmp

    if filecmp.cmp(first, other, shallow=False):
        return True
    try:
        a, b = (pydicom.dcmread(p, force=True).pixel_array for p in (first, other))
    except Exception:  # noqa: BLE001 - a copy that cannot be decoded is not the same image
        return False
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _is_image(ds: Dataset) -> bool:
    return (
        all(k in ds for k in ("Rows", "Columns", "BitsAllocated"))
        and str(ds.get("SOPClassUID", "")) not in _NOT_SEGMENTABLE_SOP_CLASSES
        and str(ds.get("Modality", "")) not in {"SEG", "RTSTRUCT", "RTDOSE", "SR", "PR", "KO"}
    )


def _scan(files: Sequence[Path]) -> tuple[dict[str, _Series], dict[str, int]]:
    """Group image headers by SeriesInstanceUID; count what was skipped and why."""
    series: dict[str, _Series] = {}
    skipped: dict[str, int] = {}
    seen: dict[str, Path] = {}  # SOPInstanceUID -> the first file that carried it
    for f in files:
        ds = _read_header(f)
        if ds is None:
            skipped["not DICOM"] = skipped.get("not DICOM", 0) + 1
            continue
        if not _is_image(ds):
            sop = str(ds.get("SOPClassUID", ""))
            name = (_NOT_SEGMENTABLE_SOP_CLASSES.get(sop) or UID(sop).name) if sop else "unknown"
            skipped[name] = skipped.get(name, 0) + 1
            continue
        if _is_localizer(ds):
            skipped["localizer"] = skipped.get("localizer", 0) + 1
            continue
        if "SeriesInstanceUID" not in ds:
            skipped["image without SeriesInstanceUID"] = skipped.get("image without SeriesInstanceUID", 0) + 1
            continue
        uid = str(ds.SeriesInstanceUID)
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if sop_uid and sop_uid in seen:
            if not _same_image(seen[sop_uid], f):
                raise InvalidVolume("two files of the series carry the same SOPInstanceUID with different pixel "
                                    "data, so which image belongs there is unknown; send one copy of each image")
            skipped["duplicate file"] = skipped.get("duplicate file", 0) + 1
            continue
        seen[sop_uid] = f
        s = series.setdefault(
            uid, _Series(uid, str(ds.get("SeriesDescription", "")), str(ds.get("Modality", "")))
        )
        s.headers.append((f, ds))
    logger.info(
        "DICOM scan: %d file(s), %d image series, skipped %s",
        len(files),
        len(series),
        dict(skipped) or "nothing",
    )
    return series, skipped


def _is_localizer(ds: Dataset) -> bool:
    value = ds.get("ImageType") or []
    image_type = [str(value).upper()] if isinstance(value, str) else [str(v).upper() for v in value]
    return len(image_type) >= 3 and image_type[2] == "LOCALIZER"


def _info(s: _Series) -> SeriesInfo:
    count = sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in s.headers)
    return SeriesInfo(s.uid, s.description, s.modality, count)


def _choose(series: dict[str, _Series], skipped: dict[str, int], series_uid: str | None) -> _Series:
    if not series:
        what = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())) or "no files"
        raise InvalidVolume(
            f"no DICOM image series found (found: {what}); upload CT or MR image files, not "
            "structured reports, segmentations, structure sets or other non-image objects"
        )
    listing = "; ".join(i.describe() for i in sorted(map(_info, series.values()), key=lambda i: -i.image_count))
    if series_uid is not None:
        if series_uid not in series:
            raise InvalidVolume(f"series {series_uid} is not among the image series found: {listing}")
        return series[series_uid]
    if len(series) > 1:
        raise InvalidVolume(
            f"the input holds {len(series)} image series; choose one by its SeriesInstanceUID (msam segment "
            f"--series-uid; POST /segment and /volumes: the form field series_uid): {listing}"
        )
    return next(iter(series.values()))


# ---------------------------------------------------------------------------------------------
# geometry


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InvalidVolume(f"the series has a missing or malformed {what}; it is not a usable 3D image")
    return arr


def _pair(values: np.ndarray) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """A functional group macro for one frame: per-frame if present, else shared."""
    for groups_kw, idx in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_kw)
        if groups and len(groups) > idx:
            items = groups[idx].get(sequence)
            if items:
                return items[0]  # type: ignore[no-any-return]
    return None


def _frames_of(path: Path, header_index: int, ds: Dataset) -> list[_Frame]:
    rows, cols = int(ds.Rows), int(ds.Columns)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidVolume(
            f"the series holds colour images ({ds.get('PhotometricInterpretation', '?')}); only greyscale "
            "CT/MR images can be segmented"
        )
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        frames = []
        for f in range(n_frames):
            pos = _group_item(ds, f, "PlanePositionSequence")
            ori = _group_item(ds, f, "PlaneOrientationSequence")
            meas = _group_item(ds, f, "PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                raise InvalidVolume(
                    "a multi-frame instance lacks plane position, orientation or pixel measures for "
                    f"frame {f + 1}; it is not a cross-sectional 3D image"
                )
            pvt = _group_item(ds, f, "PixelValueTransformationSequence")
            src = pvt if pvt is not None else ds
            frames.append(
                _Frame(
                    path,
                    header_index,
                    f + 1,
                    _floats(pos.get("ImagePositionPatient"), 3, "Image Position (Patient)"),
                    _floats(ori.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)"),
                    _pair(_floats(meas.get("PixelSpacing"), 2, "Pixel Spacing")),
                    rows,
                    cols,
                    float(src.get("RescaleSlope", 1.0) or 1.0),
                    float(src.get("RescaleIntercept", 0.0) or 0.0),
                )
            )
        return frames
    if n_frames != 1:
        raise InvalidVolume(
            f"a multi-frame instance ({n_frames} frames) has no per-frame geometry; only cross-sectional "
            "series (CT, MR, PET, Enhanced/Legacy Converted multi-frame) are supported"
        )
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise InvalidVolume(
            "the images lack Image Position/Orientation (Patient); they are not cross-sectional "
            "slices (a projection X-ray or secondary capture cannot be segmented in 3D)"
        )
    return [
        _Frame(
            path,
            header_index,
            None,
            _floats(ds.ImagePositionPatient, 3, "Image Position (Patient)"),
            _floats(ds.ImageOrientationPatient, 6, "Image Orientation (Patient)"),
            _pair(_floats(ds.get("PixelSpacing"), 2, "Pixel Spacing")),
            rows,
            cols,
            float(ds.get("RescaleSlope", 1.0) or 1.0),
            float(ds.get("RescaleIntercept", 0.0) or 0.0),
        )
    ]


def _geometry(frames: list[_Frame], headers: list[tuple[Path, Dataset]]) -> tuple[list[_Frame], np.ndarray]:
    """Sort frames along the slice normal, check they form one regular grid; return the LPS affine."""
    first = frames[0]
    if any((f.rows, f.columns) != (first.rows, first.columns) for f in frames):
        sizes = sorted({(f.rows, f.columns) for f in frames})
        raise InvalidVolume(f"the series mixes image sizes {sizes}; all slices of a volume must have one size")
    if any(np.max(np.abs(f.orientation - first.orientation)) > _ORIENTATION_TOL for f in frames):
        raise InvalidVolume(
            "the series mixes slice orientations (e.g. axial and sagittal images, or a localizer); "
            "upload one stack of parallel slices"
        )
    if any(np.max(np.abs(np.subtract(f.pixel_spacing, first.pixel_spacing))) > 1e-4 for f in frames):
        raise InvalidVolume("the series mixes pixel spacings; all slices of a volume must share one spacing")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2 or abs(row_dir @ col_dir) > 1e-2:
        raise InvalidVolume("Image Orientation (Patient) is not two orthogonal unit vectors")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    depth = np.array([f.position @ normal for f in frames])
    order = np.argsort(depth, kind="stable")
    frames = [frames[i] for i in order]
    depth = depth[order]
    row_spacing, col_spacing = first.pixel_spacing
    if row_spacing <= 0 or col_spacing <= 0:
        raise InvalidVolume(f"Pixel Spacing must be positive, got {list(first.pixel_spacing)}")

    if len(frames) == 1:
        ds = headers[first.header_index][1]
        thickness = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        step = normal * abs(thickness)
    else:
        gaps = np.diff(depth)
        if np.any(gaps < _POSITION_EPS_MM):
            n_dup = int(np.sum(gaps < _POSITION_EPS_MM))
            raise InvalidVolume(
                f"{n_dup} slice(s) share a position with another slice: the series holds several volumes "
                "(time points, echoes, b-values or repeated acquisitions); split it and upload one volume"
            )
        median = float(np.median(gaps))
        bad = np.abs(gaps - median) > _SPACING_RTOL * median
        if np.any(bad):
            worst = float(gaps[np.argmax(np.abs(gaps - median))])
            ratio = worst / median
            if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
                raise InvalidVolume(
                    f"slices are missing from the series: a gap of {worst:.3g} mm where the slice spacing is "
                    f"{median:.3g} mm (about {round(ratio) - 1} missing slice(s)); upload the complete series"
                )
            raise InvalidVolume(
                f"the slice spacing is uneven (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm); the series "
                "is not a regular 3D grid (missing slices or a variable-spacing acquisition)"
            )
        extent = frames[-1].position - frames[0].position
        along = float(extent @ normal)
        tilt = np.degrees(np.arctan2(np.linalg.norm(extent - along * normal), along))
        if tilt > _TILT_TOL_DEG:
            raise InvalidVolume(
                f"the slices are sheared by {tilt:.2f} degrees relative to their normal (gantry tilt); tilted "
                "series are not supported: resample it to an orthogonal grid first (or upload a reconstruction "
                "without tilt)"
            )
        step = extent / (len(frames) - 1)
        # every slice must sit where the affine puts it, in-plane as well as along the normal
        positions = np.array([f.position for f in frames])
        residual = positions - (frames[0].position + np.arange(len(frames))[:, None] * step)
        in_plane = np.linalg.norm(residual - np.outer(residual @ normal, normal), axis=1)
        if in_plane.max() > 0.1 * min(row_spacing, col_spacing):
            raise InvalidVolume(
                f"slices are shifted in-plane against each other by up to {in_plane.max():.3g} mm; the series "
                "is not a regular 3D grid"
            )
        if np.max(np.abs(residual @ normal)) > 0.1 * median:
            raise InvalidVolume(
                "the slice spacing drifts along the series; the series is not a regular 3D grid"
            )

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # i: along a row, one column per step
    affine_lps[:3, 1] = col_dir * row_spacing  # j: down a column, one row per step
    affine_lps[:3, 2] = step  # k: along the slice normal
    affine_lps[:3, 3] = frames[0].position
    return frames, affine_lps


# ---------------------------------------------------------------------------------------------
# pixels


def _pixels(ds: Dataset, what: str) -> np.ndarray:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InvalidVolume(f"{what} has no pixel data; it is not an image")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = UID(str(ts)).name if ts != "?" else "unknown"
        raise InvalidVolume(
            f"the pixel data of {what} cannot be decoded (transfer syntax {name}): {type(exc).__name__}: "
            f"{str(exc)[:200]}"
        ) from None


def _read(series: _Series) -> Volume:
    headers = series.headers
    modalities: dict[str, int] = {}
    for _, ds in headers:
        m = str(ds.get("Modality", "") or "") or "none"
        modalities[m] = modalities.get(m, 0) + 1
    if len(modalities) > 1:  # the volume's modality (intensity window, prior) would depend on file order
        counts = ", ".join(f"{n} {m}" for m, n in sorted(modalities.items()))
        raise InvalidVolume(f"series {series.uid} mixes modalities ({counts} images); a volume must be one "
                            "acquisition: upload the files of one modality only")
    frames: list[_Frame] = []
    for idx, (path, ds) in enumerate(headers):
        frames.extend(_frames_of(path, idx, ds))
    frames, affine_lps = _geometry(frames, headers)

    integral = all(f.slope == 1.0 and float(f.intercept).is_integer() for f in frames)
    shape = (frames[0].columns, frames[0].rows, len(frames))
    out = np.empty(shape, dtype=np.int32 if integral else np.float32)
    cache: dict[int, np.ndarray] = {}
    needed_by: dict[int, int] = {}
    for f in frames:
        needed_by[f.header_index] = needed_by.get(f.header_index, 0) + 1
    transfer_syntaxes: set[str] = set()
    for k, f in enumerate(frames):
        if f.header_index not in cache:
            try:
                full = pydicom.dcmread(f.path, force=True)
            except Exception as exc:  # noqa: BLE001
                raise InvalidVolume(f"a file of the series cannot be read again ({type(exc).__name__})") from None
            transfer_syntaxes.add(str(full.file_meta.get("TransferSyntaxUID", "")))
            data = _pixels(full, f"instance {k + 1} of the series")
            if f.frame_number is None:
                data = data.reshape(1, f.rows, f.columns)
            else:
                n_frames = int(full.get("NumberOfFrames", 1) or 1)
                data = data.reshape(n_frames, f.rows, f.columns)
            cache[f.header_index] = data
        raw = cache[f.header_index][(f.frame_number or 1) - 1]
        if integral:
            out[:, :, k] = raw.T.astype(np.int32) + int(f.intercept)
        else:
            out[:, :, k] = raw.T.astype(np.float64) * f.slope + f.intercept
        needed_by[f.header_index] -= 1
        if needed_by[f.header_index] == 0:
            del cache[f.header_index]
    array: np.ndarray = out
    if integral and out.size and out.min() >= np.iinfo(np.int16).min and out.max() <= np.iinfo(np.int16).max:
        array = out.astype(np.int16)

    slice_refs = tuple(
        SliceRef(
            str(headers[f.header_index][1].SOPInstanceUID),
            str(headers[f.header_index][1].SOPClassUID),
            f.header_index,
            f.frame_number,
        )
        for f in frames
    )
    datasets = tuple(ds for _, ds in headers)
    if not any(r.frame_number is not None for r in slice_refs):
        # single-frame: keep the headers in slice order, re-index the references
        datasets = tuple(headers[r.dataset_index][1] for r in slice_refs)
        slice_refs = tuple(
            SliceRef(r.sop_instance_uid, r.sop_class_uid, k, None) for k, r in enumerate(slice_refs)
        )
    first = datasets[0]
    meta = {
        "format": "dicom",
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "series_instance_uid": series.uid,
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "series_description": series.description,
        "sop_class_uid": str(first.SOPClassUID),
        "sop_instance_uids": [r.sop_instance_uid for r in slice_refs],
        "frame_numbers": [r.frame_number for r in slice_refs],
        "transfer_syntax_uids": sorted(transfer_syntaxes),
        "dicom_source": DicomSource(datasets, slice_refs),
    }
    logger.info("DICOM series read: %d slice(s) of %dx%d", len(frames), frames[0].columns, frames[0].rows)
    return Volume(array=array, affine=LPS_TO_RAS @ affine_lps, modality=series.modality or None, meta=meta)
