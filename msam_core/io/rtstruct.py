"""RT Structure Set (RTSTRUCT) output for masks computed on a DICOM input, written with pydicom.

No maintained library fits: highdicom has no RTSTRUCT, and rt-utils pulls in OpenCV and traces
contours through pixel centres (a one-voxel lesion vanishes). Here contours follow the **pixel
edges** of the mask, so the polygons enclose exactly the mask's pixels: rasterising them again
(pixel centre inside, even-odd rule) gives the mask back voxel for voxel (:func:`read_rtstruct`).

- one ROI per mask label; ROI Number = the label;
- one or more CLOSED_PLANAR contours per slice and ROI, each referencing its source image (SOP
  instance, plus frame number for multi-frame sources); holes are inner contours, to be combined
  with the outer one by the even-odd (XOR) rule as most planning systems do;
- Contour Data is in DICOM patient coordinates (**LPS** mm), computed from the source volume's
  affine (:func:`~msam_core.io.dicom.volume_affine_lps`), i.e. on the source's own slice planes.

Text follows :mod:`msam_core.io.dicom_text`, as for the DICOM-SEG: ROI names checked by the rule
the API applies, UTF-8 when the text does not fit the source's character set, and source
patient/study attributes that break their VR left empty with a warning.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from msam_core.errors import InvalidVolume, UnsupportedRequest
from msam_core.io.dicom import DicomSource, volume_affine_lps
from msam_core.io.dicom_text import apply_character_set, conform_source_header
from msam_core.io.seg import check_mask, checked_labels, long_string, msam_version, report, source_of
from msam_core.io.volume import Volume

__all__ = ["RT_STRUCTURE_SET_STORAGE", "mask_to_polygons", "read_rtstruct", "write_rtstruct"]

logger = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
#: Detached Study Management (retired, but the class every RTSTRUCT writer puts here)
_STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"

_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)

_COLOURS = [(255, 0, 0), (0, 200, 0), (0, 100, 255), (255, 200, 0), (200, 0, 255), (0, 220, 220)]

# Direction (d_row, d_col) of each kind of boundary edge, interior on a fixed side.
_Vertex = tuple[int, int]


def mask_to_polygons(slice_mask: np.ndarray) -> list[list[_Vertex]]:
    """Closed polygons along the pixel edges of a 2D boolean mask ``[row, column]``.

    Vertices are pixel *corners* ``(R, C)``: the corner at the top-left of pixel ``(R, C)``, i.e. the
    point ``(row, column) = (R - 0.5, C - 0.5)`` in pixel index space. Outer boundaries and hole
    boundaries come out with opposite winding; pixels touching only diagonally get separate
    polygons. Collinear vertices are dropped.
    """
    b = np.pad(np.asarray(slice_mask, dtype=bool), 1)
    core = b[1:-1, 1:-1]
    r, c = np.nonzero(core & ~b[:-2, 1:-1])  # top side exposed
    edges: dict[_Vertex, list[_Vertex]] = {}

    def add(starts_r: np.ndarray, starts_c: np.ndarray, ends_r: np.ndarray, ends_c: np.ndarray) -> None:
        for a0, a1, e0, e1 in zip(starts_r.tolist(), starts_c.tolist(), ends_r.tolist(), ends_c.tolist()):
            edges.setdefault((a0, a1), []).append((e0, e1))

    add(r, c + 1, r, c)  # top: right to left
    r, c = np.nonzero(core & ~b[1:-1, :-2])  # left side exposed
    add(r, c, r + 1, c)  # left: top to bottom
    r, c = np.nonzero(core & ~b[2:, 1:-1])  # bottom side exposed
    add(r + 1, c, r + 1, c + 1)  # bottom: left to right
    r, c = np.nonzero(core & ~b[1:-1, 2:])  # right side exposed
    add(r + 1, c + 1, r, c + 1)  # right: bottom to top

    polygons: list[list[_Vertex]] = []
    while edges:
        start = next(iter(edges))
        loop = [start]
        prev = start
        current = _pop_edge(edges, start, None)
        while current != start:
            loop.append(current)
            incoming = (current[0] - prev[0], current[1] - prev[1])
            prev, current = current, _pop_edge(edges, current, incoming)
        polygons.append(_drop_collinear(loop))
    return polygons


def _pop_edge(edges: dict[_Vertex, list[_Vertex]], vertex: _Vertex, incoming: tuple[int, int] | None) -> _Vertex:
    outs = edges[vertex]
    pick = 0
    if len(outs) > 1 and incoming is not None:
        # At a saddle (two pixels touching by a corner) turn towards the interior, which lies at
        # (-d_col, d_row) of an edge's direction: keeps diagonal neighbours in separate polygons.
        inward = (-incoming[1], incoming[0])
        for n, end in enumerate(outs):
            if (end[0] - vertex[0], end[1] - vertex[1]) == inward:
                pick = n
                break
    end = outs.pop(pick)
    if not outs:
        del edges[vertex]
    return end


def _drop_collinear(loop: list[_Vertex]) -> list[_Vertex]:
    out = []
    n = len(loop)
    for idx in range(n):
        a, b, c = loop[idx - 1], loop[idx], loop[(idx + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0:
            out.append(b)
    return out


def _ds(v: float) -> str:
    text = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def write_rtstruct(
    mask: np.ndarray,
    source: Volume,
    path: str | Path,
    roi_names: Mapping[int, str] | None = None,
    algorithm_version: str | None = None,
    *,
    algorithm_name: str = "msam",
    generation_algorithm: str = "SEMIAUTOMATIC",
    series_description: str = "msam lesion contours",
    series_number: int = 902,
    structure_set_label: str = "MSAM",
    manufacturer: str = "msam",
    warnings: list[str] | None = None,
) -> Path:
    """Write ``mask`` (labels ``0..K`` on ``source``'s grid) as an RT Structure Set.

    Args:
        mask: integer labels, same shape and layout as ``source.array``; 0 is background.
        source: the DICOM volume the mask was computed on.
        path: output file (``.rtstruct.dcm`` by convention).
        roi_names: label -> ROI name (default ``"Lesion <label>"``).
        algorithm_version: recorded in ROI Generation Description (default: msam's version).
        algorithm_name: recorded in ROI Generation Description (the service gives the model's name).
        generation_algorithm: ``SEMIAUTOMATIC`` for prompted runs, ``AUTOMATIC`` otherwise.
        warnings: receives one sentence per source attribute left empty in the RTSTRUCT (a
            value that breaks its VR); logged when not given.

    Raises:
        UnsupportedRequest: ``source`` is not a DICOM volume, or the mask is empty.
        InvalidPrompt: an ROI name breaks the DICOM LO rules.
        ValueError: the mask does not fit ``source``.
    """
    src = source_of(source, "RTSTRUCT")
    labels_arr = check_mask(mask, source)
    present = [int(v) for v in np.unique(labels_arr) if v != 0]
    if not present:
        raise UnsupportedRequest("the segmentation is empty (no lesion voxel); there is nothing to contour")
    names = checked_labels(roi_names, present)
    version_text = algorithm_version or msam_version()
    affine = volume_affine_lps(source)
    header = conform_source_header(src.datasets[0])
    first = header.dataset
    for_uid = str(source.meta.get("frame_of_reference_uid") or first.FrameOfReferenceUID)
    now = _dt.datetime.now(_dt.UTC)

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    for kw in _PATIENT_STUDY_KEYWORDS:
        if kw in first:  # the Type 2 ones always are (conform_source_header adds them empty)
            setattr(ds, kw, first[kw].value)
    # Frame of Reference (part of the RT Structure Set IOD since 2019): the source's frame
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    # RT Series + General Equipment
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "msam"
    ds.SoftwareVersions = msam_version()
    # Structure Set
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetName = "msam lesions"
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame_of_reference(src, for_uid, source)])

    rois: list[Dataset] = []
    contours: list[Dataset] = []
    observations: list[Dataset] = []
    for n, label in enumerate(present):
        roi = Dataset()
        roi.ROINumber = label
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = names[label]
        roi.ROIGenerationAlgorithm = generation_algorithm
        roi.ROIGenerationDescription = long_string(f"{algorithm_name} {version_text}")
        rois.append(roi)

        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = label
        roi_contour.ROIDisplayColor = list(_COLOURS[n % len(_COLOURS)])
        items: list[Dataset] = []
        for k in range(labels_arr.shape[2]):
            plane = labels_arr[:, :, k].T == label  # [row, column]
            if not plane.any():
                continue
            for polygon in mask_to_polygons(plane):
                corners = np.array(polygon, dtype=np.float64) - 0.5  # (row, column) index space
                ijk = np.column_stack([corners[:, 1], corners[:, 0], np.full(len(corners), float(k))])
                lps = ijk @ affine[:3, :3].T + affine[:3, 3]
                item = Dataset()
                item.ContourImageSequence = DicomSequence([_image_ref(src, k)])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(lps)
                item.ContourNumber = len(items) + 1
                item.ContourData = [_ds(v) for v in lps.ravel()]
                items.append(item)
        roi_contour.ContourSequence = DicomSequence(items)
        contours.append(roi_contour)

        obs = Dataset()
        obs.ObservationNumber = label
        obs.ReferencedROINumber = label
        obs.RTROIInterpretedType = ""
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    notes = header.warnings(ds, "RTSTRUCT", copied=(*_PATIENT_STUDY_KEYWORDS, "PositionReferenceIndicator"))
    charset_note = apply_character_set(ds, src.datasets[0].get("SpecificCharacterSet"), "RTSTRUCT")

    out = Path(path)
    ds.save_as(out, enforce_file_format=True)
    report(notes + ([charset_note] if charset_note else []), warnings)
    logger.info("RTSTRUCT written: %d ROI(s)", len(present))
    return out


def _image_ref(src: DicomSource, k: int) -> Dataset:
    ref = Dataset()
    s = src.slices[k]
    ref.ReferencedSOPClassUID = s.sop_class_uid
    ref.ReferencedSOPInstanceUID = s.sop_instance_uid
    if s.frame_number is not None:
        ref.ReferencedFrameNumber = s.frame_number
    return ref


def _referenced_frame_of_reference(src: DicomSource, for_uid: str, source: Volume) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = str(source.meta.get("series_instance_uid") or src.datasets[0].SeriesInstanceUID)
    if src.multiframe:
        seen: dict[str, Dataset] = {}
        for s in src.slices:
            if s.sop_instance_uid not in seen:
                ref = Dataset()
                ref.ReferencedSOPClassUID = s.sop_class_uid
                ref.ReferencedSOPInstanceUID = s.sop_instance_uid
                seen[s.sop_instance_uid] = ref
        series.ContourImageSequence = DicomSequence(list(seen.values()))
    else:
        series.ContourImageSequence = DicomSequence([_image_ref(src, k) for k in range(len(src.slices))])
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_REFERENCE_CLASS
    study.ReferencedSOPInstanceUID = str(source.meta.get("study_instance_uid") or src.datasets[0].StudyInstanceUID)
    study.RTReferencedSeriesSequence = DicomSequence([series])
    item = Dataset()
    item.FrameOfReferenceUID = for_uid
    item.RTReferencedStudySequence = DicomSequence([study])
    return item


def read_rtstruct(path: str | Path, source: Volume, *, tol_voxel: float = 1e-3) -> np.ndarray:
    """Rasterise an RTSTRUCT on ``source``'s grid: labels = ROI Numbers (``source.array`` layout).

    Contours (LPS mm) are mapped into ``source``'s voxel space; each must lie on one slice plane.
    A pixel belongs to an ROI when its centre is inside an odd number of that ROI's contours on
    its slice (even-odd rule). Later ROIs overwrite earlier ones where they overlap.

    Raises:
        InvalidVolume: not an RTSTRUCT, another frame of reference, or a contour off the slices.
    """
    ds = pydicom.dcmread(path)
    if str(ds.get("SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
        raise InvalidVolume("not an RT Structure Set")
    for_uid = source.meta.get("frame_of_reference_uid")
    roi_for = {int(r.ROINumber): str(r.ReferencedFrameOfReferenceUID) for r in ds.StructureSetROISequence}
    inv = np.linalg.inv(volume_affine_lps(source))
    ni, nj, nk = source.shape
    out = np.zeros(source.shape, dtype=np.uint16)
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        if for_uid and roi_for.get(number) != for_uid:
            raise InvalidVolume(f"ROI {number} is in another frame of reference than the image")
        parity = np.zeros(source.shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            pts = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            ijk = pts @ inv[:3, :3].T + inv[:3, 3]
            k = float(np.mean(ijk[:, 2]))
            if np.max(np.abs(ijk[:, 2] - round(k))) > tol_voxel or not 0 <= round(k) < nk:
                raise InvalidVolume(f"a contour of ROI {number} does not lie on a slice of the image")
            parity[:, :, round(k)] ^= _inside(ijk[:, 0], ijk[:, 1], ni, nj)
        out[parity] = number
    return out


def _inside(xs: np.ndarray, ys: np.ndarray, ni: int, nj: int) -> np.ndarray:
    """Pixel centres ``(i, j)`` of an ``ni x nj`` grid inside the polygon (even-odd crossing rule)."""
    inside = np.zeros((ni, nj), dtype=bool)
    i0, i1 = max(int(np.floor(xs.min())), 0), min(int(np.ceil(xs.max())), ni - 1)
    j0, j1 = max(int(np.floor(ys.min())), 0), min(int(np.ceil(ys.max())), nj - 1)
    if i0 > i1 or j0 > j1:
        return inside
    gi, gj = np.meshgrid(np.arange(i0, i1 + 1, dtype=np.float64), np.arange(j0, j1 + 1, dtype=np.float64), indexing="ij")
    acc = np.zeros(gi.shape, dtype=bool)
    x0, y0 = xs, ys
    x1, y1 = np.roll(xs, -1), np.roll(ys, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):
        if b == d:
            continue
        crosses = (b > gj) != (d > gj)
        x_at = a + (gj - b) * (c - a) / (d - b)
        acc ^= crosses & (gi < x_at)
    inside[i0 : i1 + 1, j0 : j1 + 1] = acc
    return inside
