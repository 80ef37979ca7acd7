"""A radiologist's line measurements stored in a PACS, found for one series: DICOM SR (TID 1500
and any SR that holds them) and Grayscale Softcopy Presentation States (GSPS).

* **SR**: every ``SCOORD`` item of graphic type ``POLYLINE`` whose image (its ``SELECTED FROM``
  child) is a slice of the series, and every ``SCOORD3D`` ``POLYLINE`` in the series' frame of
  reference. The length a workstation reported beside it, when there is one, is the ``NUM``
  item (in mm) that the line is ``INFERRED FROM`` (TID 300), or the one ``NUM`` in the same
  measurement group (TID 1410). The content tree is walked with pydicom, so lines from any
  template are found; highdicom's parser only knows the TID 1500 groups it writes.
* **GSPS**: every ``POLYLINE`` graphic object in ``PIXEL`` units of a graphic annotation that
  applies to exactly one image of the series (``DISPLAY`` units depend on the viewport and are
  skipped).

Image coordinates (column, row) have the top left corner of the first pixel at (0, 0), so the
centre of the pixel in column ``i``, row ``j`` is ``(i + 0.5, j + 0.5)``; they are mapped to voxel
``(i, j, k)`` of the series (``k`` = the slice the SOP instance is) and from there through the
volume's affine to **LPS** mm. A polyline of more than two points is taken for its two points
farthest apart (its long axis).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from msam_core.io.volume import LPS_TO_RAS, Volume

__all__ = ["FoundLine", "find_lines", "lines_in_gsps", "lines_in_sr"]

logger = logging.getLogger(__name__)

_LENGTH_CONCEPTS = {("SCT", "103339001"), ("SCT", "410668003"), ("SCT", "81827009"), ("DCM", "121206"),
                    ("DCM", "G-A22A"), ("SRT", "G-A185"), ("SRT", "G-D7FE")}
_GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


@dataclass(frozen=True)
class FoundLine:
    """A line measurement found for a series: endpoints in LPS mm, where it came from (``"SR"``
    or ``"GSPS"``) and the length the workstation reported beside it (mm), if any."""

    start_lps: tuple[float, float, float]
    end_lps: tuple[float, float, float]
    source: str
    reported_length_mm: float | None = None

    @property
    def length_mm(self) -> float:
        return float(np.linalg.norm(np.subtract(self.end_lps, self.start_lps)))


def _farthest_two(points: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return points[[i, j]]


def _slice_of(volume: Volume) -> dict[str, int]:
    """SOP Instance UID -> slice index ``k`` (single-frame series)."""
    uids = volume.meta.get("sop_instance_uids") or []
    frames = volume.meta.get("frame_numbers") or [None] * len(uids)
    return {uid: k for k, (uid, frame) in enumerate(zip(uids, frames)) if frame is None}


def _pixels_to_lps(volume: Volume, xy: np.ndarray, k: int) -> np.ndarray:
    voxels = np.column_stack([xy[:, 0] - 0.5, xy[:, 1] - 0.5, np.full(len(xy), float(k))])
    return volume.voxel_to_ras(voxels) * LPS_TO_RAS[:3, :3].diagonal()


def _code(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return str(seq[0].get("CodingSchemeDesignator", "")), str(seq[0].get("CodeValue", ""))


def _length_mm(item: Dataset) -> float | None:
    """The value of a NUM item that is a length in mm, else ``None``."""
    if item.get("ValueType") != "NUM" or _code(item) not in _LENGTH_CONCEPTS:
        return None
    for mv in item.get("MeasuredValueSequence") or []:
        units = mv.get("MeasurementUnitsCodeSequence")
        if units and str(units[0].get("CodeValue")) == "mm":
            return float(mv.NumericValue)
    return None


def _scoord_line(item: Dataset, volume: Volume, slices: dict[str, int]) -> np.ndarray | None:
    """``(2, 3)`` LPS endpoints of an SCOORD / SCOORD3D polyline on this series, else ``None``."""
    if str(item.get("GraphicType", "")) != "POLYLINE":
        return None
    data = np.asarray(item.get("GraphicData") or [], dtype=np.float64)
    if item.ValueType == "SCOORD3D":
        if str(item.get("ReferencedFrameOfReferenceUID", "")) != volume.meta.get("frame_of_reference_uid"):
            return None
        points = data.reshape(-1, 3)
    else:
        refs = [ref for child in item.get("ContentSequence") or [] for ref in child.get("ReferencedSOPSequence") or []]
        ks = {slices.get(str(ref.ReferencedSOPInstanceUID)) for ref in refs}
        if len(ks) != 1 or None in ks:
            return None  # another series' image, or several images
        points = _pixels_to_lps(volume, data.reshape(-1, 2), ks.pop())  # type: ignore[arg-type]
    return _farthest_two(points) if len(points) >= 2 else None


def lines_in_sr(ds: Dataset, volume: Volume) -> list[FoundLine]:
    """The polylines of an SR document that lie on ``volume``'s series."""
    slices = _slice_of(volume)
    found: list[FoundLine] = []

    def walk(items: Iterable[Dataset]) -> None:
        items = list(items)
        group_lengths = [v for v in (_length_mm(i) for i in items) if v is not None]
        group_lines = []
        for item in items:
            if item.get("ValueType") in ("SCOORD", "SCOORD3D"):
                line = _scoord_line(item, volume, slices)
                if line is not None:
                    group_lines.append(line)
            elif item.get("ValueType") == "NUM" and _length_mm(item) is not None:
                # TID 300: the length is INFERRED FROM the line below it
                for child in item.get("ContentSequence") or []:
                    if child.get("ValueType") in ("SCOORD", "SCOORD3D"):
                        line = _scoord_line(child, volume, slices)
                        if line is not None:
                            found.append(_found(line, "SR", _length_mm(item)))
                continue
            if item.get("ContentSequence"):
                walk(item.ContentSequence)
        reported = group_lengths[0] if len(group_lines) == 1 and len(group_lengths) == 1 else None
        found.extend(_found(line, "SR", reported) for line in group_lines)

    walk(ds.get("ContentSequence") or [])
    return found


def lines_in_gsps(ds: Dataset, volume: Volume) -> list[FoundLine]:
    """The ``PIXEL`` polylines of a GSPS that each apply to one image of ``volume``'s series."""
    slices = _slice_of(volume)
    found: list[FoundLine] = []
    for annotation in ds.get("GraphicAnnotationSequence") or []:
        refs = annotation.get("ReferencedImageSequence") or []
        ks = {slices.get(str(r.ReferencedSOPInstanceUID)) for r in refs}
        if len(ks) != 1 or None in ks:
            continue
        k = ks.pop()
        for obj in annotation.get("GraphicObjectSequence") or []:
            if str(obj.get("GraphicType")) != "POLYLINE" or str(obj.get("GraphicAnnotationUnits")) != "PIXEL":
                continue
            points = np.asarray(obj.GraphicData, dtype=np.float64).reshape(-1, 2)
            if len(points) >= 2:
                found.append(_found(_farthest_two(_pixels_to_lps(volume, points, k)), "GSPS", None))  # type: ignore[arg-type]
    return found


def _found(line: np.ndarray, source: str, reported: float | None) -> FoundLine:
    return FoundLine(tuple(float(v) for v in line[0]), tuple(float(v) for v in line[1]), source, reported)  # type: ignore[arg-type]


def find_lines(datasets: Iterable[Dataset], volume: Volume) -> list[FoundLine]:
    """Every line measurement on ``volume``'s series in ``datasets`` (SR documents and GSPS;
    other objects ignored), without repeats (the same endpoints within 0.01 mm), longest
    first within each source, SR before GSPS."""
    found: list[FoundLine] = []
    for ds in datasets:
        if str(ds.get("Modality", "")) == "SR" or str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.88."):
            found += lines_in_sr(ds, volume)
        elif str(ds.get("SOPClassUID", "")) == _GSPS_CLASS:
            found += lines_in_gsps(ds, volume)
    unique: list[FoundLine] = []
    for line in found:
        ends = np.array([line.start_lps, line.end_lps])
        if not any(np.allclose(ends, [u.start_lps, u.end_lps], atol=1e-2)
                   or np.allclose(ends[::-1], [u.start_lps, u.end_lps], atol=1e-2) for u in unique):
            unique.append(line)
    unique.sort(key=lambda f: (f.source != "SR", -f.length_mm))
    logger.info("line measurements found: %d", len(unique))
    return unique
