"""DICOM Segmentation (SEG) output for masks computed on a DICOM input, written with highdicom.

The mask is in the source :class:`Volume`'s array layout (``mask[i, j, k]`` = column ``i``, row
``j``, slice ``k``; see :mod:`msam_core.io.dicom`). SEG frames are laid out pixel for pixel on the
*source* frames they reference, so the SEG shares the source's frame of reference and geometry
exactly; no resampling and no RAS/LPS conversion happens on the writing side. The reading side
(:func:`read_seg`) goes through the SEG's own plane positions in **LPS** and maps them into the
source grid, so a SEG whose geometry disagrees with its source (a mirrored SEG) cannot read back
as correct.

Text follows :mod:`msam_core.io.dicom_text`: segment labels are checked by the same rule the API
applies, the SEG is written in UTF-8 when its text does not fit the source's character set, and
a patient/study attribute of the source that breaks its VR is left empty with a warning instead
of failing the SEG.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as sr_codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from msam_core.errors import InvalidPrompt, InvalidVolume, UnsupportedRequest
from msam_core.io.dicom import DicomSource, volume_affine_lps
from msam_core.io.dicom_text import (
    TextRuleError,
    apply_character_set,
    check_long_string,
    clean_long_string,
    conform_source_header,
)
from msam_core.io.volume import Volume

__all__ = [
    "DEFAULT_CATEGORY",
    "DEFAULT_TYPE",
    "checked_labels",
    "long_string",
    "msam_version",
    "read_seg",
    "source_of",
    "write_seg",
]

logger = logging.getLogger(__name__)

#: SNOMED CT 49755003 "Morphologically Abnormal Structure"
DEFAULT_CATEGORY: Code = sr_codes.SCT.MorphologicallyAbnormalStructure
#: SNOMED CT 108369006 "Neoplasm"
DEFAULT_TYPE: Code = sr_codes.SCT.Neoplasm
_TRACKING_RE = re.compile(r"^msam lesion (\d+)$")


def long_string(text: str) -> str:
    """``text`` (composed by msam, e.g. a model's name) made into a valid DICOM LO value; see
    :func:`~msam_core.io.dicom_text.clean_long_string`."""
    return clean_long_string(text)


def checked_labels(names: Mapping[int, str] | None, present: list[int]) -> dict[int, str]:
    """Label -> segment label / ROI name for every label in ``present``: the given name checked by
    :func:`~msam_core.io.dicom_text.check_long_string` (the rule the API applies), else
    ``"Lesion <label>"``. A name that breaks the rule is :class:`InvalidPrompt`, never written."""
    out: dict[int, str] = {}
    for label in present:
        name = (names or {}).get(label)
        if name is None:
            out[label] = f"Lesion {label}"
            continue
        try:
            out[label] = check_long_string(name)
        except TextRuleError as exc:
            raise InvalidPrompt(f"lesion {label}: {exc}") from None
    return out


def report(notes: list[str], into: list[str] | None) -> None:
    """Hand a writer's warnings to the caller's list, or log them when the caller gave none.
    Warnings name attributes, never their values."""
    if into is not None:
        into.extend(notes)
    else:
        for note in notes:
            logger.warning("%s", note)


def msam_version() -> str:
    """The installed msam version ("0.0.0" when run from a source tree that is not installed)."""
    try:
        return version("msam")
    except PackageNotFoundError:
        return "0.0.0"


def source_of(volume: Volume, what: str) -> DicomSource:
    """The DICOM source headers of ``volume``, or :class:`UnsupportedRequest` if it is not DICOM."""
    src = volume.meta.get("dicom_source")
    if not isinstance(src, DicomSource):
        raise UnsupportedRequest(
            f"{what} output needs a DICOM input (the image was {volume.meta.get('format', 'not DICOM')}); "
            "ask for NIfTI output instead"
        )
    if len(src.slices) != volume.shape[2]:
        raise UnsupportedRequest(f"{what} output: the volume no longer matches its DICOM source slices")
    return src


def check_mask(mask: np.ndarray, source: Volume) -> np.ndarray:
    """Validate a label mask against its source volume; return it as an unsigned integer array."""
    m = np.asarray(mask)
    if m.shape != source.shape:
        raise ValueError(f"mask shape {m.shape} differs from the source volume shape {source.shape}")
    if m.dtype == bool:
        return m.astype(np.uint8)
    if not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"the mask must hold integer labels, got dtype {m.dtype}")
    if m.size and m.min() < 0:
        raise ValueError("mask labels must be >= 0 (0 is background)")
    return m


def _frames_from_mask(labels: np.ndarray, src: DicomSource) -> tuple[list[Dataset], np.ndarray]:
    """(source_images, frames) for highdicom: frame ``f`` lies pixel for pixel on source frame ``f``."""
    slices = labels.transpose(2, 1, 0)  # (k, row, column)
    if not src.multiframe:
        return list(src.datasets), np.ascontiguousarray(slices)
    instances = {s.dataset_index for s in src.slices}
    if len(instances) != 1:
        raise UnsupportedRequest(
            "DICOM-SEG output for a series of several multi-frame instances is not supported; "
            "ask for NIfTI output instead"
        )
    ds = src.datasets[src.slices[0].dataset_index]
    n_frames = int(ds.NumberOfFrames)
    frames = np.zeros((n_frames, *slices.shape[1:]), dtype=slices.dtype)
    for k, s in enumerate(src.slices):
        frames[int(s.frame_number) - 1] = slices[k]  # type: ignore[arg-type]
    return [ds], frames


def write_seg(
    mask: np.ndarray,
    source: Volume,
    path: str | Path,
    segment_labels: Mapping[int, str] | None = None,
    codes: Mapping[int, tuple[Code, Code]] | tuple[Code, Code] | None = None,
    algorithm_version: str | None = None,
    labelmap: bool = False,
    *,
    algorithm_name: str = "msam",
    algorithm_type: str = "SEMIAUTOMATIC",
    series_description: str = "msam lesion segmentation",
    series_number: int = 901,
    manufacturer: str = "msam",
    device_serial_number: str = "msam",
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    warnings: list[str] | None = None,
) -> Path:
    """Write ``mask`` (labels ``0..K`` on ``source``'s grid) as a DICOM Segmentation.

    One segment per label present (segment numbers 1..n in ascending label order; each segment's
    Tracking ID ``"msam lesion <label>"`` keeps the mask label). Frames without any segment are
    omitted.

    Args:
        mask: integer labels, same shape and layout as ``source.array``; 0 is background.
        source: the DICOM volume the mask was computed on (from :func:`~msam_core.io.dicom.read_series`).
        path: output file.
        segment_labels: label -> segment label text (default ``"Lesion <label>"``).
        codes: ``(category, type)`` coded concepts, for all labels or per label; default SNOMED CT
            Morphologically Abnormal Structure / Neoplasm.
        algorithm_version: recorded in the algorithm identification (default: msam's version;
            the service gives the model's, :attr:`~msam_core.checkpoints.LoadedModel.version`).
        algorithm_name: the algorithm identification's name (the service gives the model's name).
        labelmap: write a LABELMAP segmentation (Label Map Segmentation Storage) instead of BINARY.
        algorithm_type: ``SEMIAUTOMATIC`` for prompted runs, ``AUTOMATIC`` otherwise.
        warnings: receives one sentence per source attribute left empty in the SEG (a value
            highdicom would refuse: a date ``19700132``, a Patient's Sex ``X``); logged when
            not given.

    Raises:
        UnsupportedRequest: ``source`` is not a DICOM volume, or it cannot be referenced.
        InvalidPrompt: a segment label breaks the DICOM LO rules.
        ValueError: the mask does not fit ``source``.
    """
    src = source_of(source, "DICOM-SEG")
    labels_arr = check_mask(mask, source)
    present = [int(v) for v in np.unique(labels_arr) if v != 0]
    if not present:
        raise UnsupportedRequest(
            "the segmentation is empty (no lesion voxel), and a DICOM-SEG cannot hold zero segments; "
            "report 'no finding' instead or ask for NIfTI output"
        )
    if len(present) > 65535:
        raise ValueError("too many labels for one DICOM-SEG (at most 65535 segments)")
    names = checked_labels(segment_labels, present)
    version_text = long_string(algorithm_version or msam_version())
    algorithm = hd.AlgorithmIdentificationSequence(
        name=long_string(algorithm_name), family=sr_codes.cid7162.ArtificialIntelligence, version=version_text
    )
    descriptions = []
    segment_of = np.zeros(int(labels_arr.max()) + 1, dtype=np.uint16)
    for number, label in enumerate(present, start=1):
        segment_of[label] = number
        category, prop_type = _codes_for(label, codes)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=names[label],
                segmented_property_category=category,
                segmented_property_type=prop_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues(algorithm_type),
                algorithm_identification=algorithm,
                tracking_id=f"msam lesion {label}",
                tracking_uid=hd.UID(),
            )
        )
    segments = segment_of[labels_arr]
    segments = segments.astype(np.uint8 if len(present) < 256 else np.uint16)
    source_images, frames = _frames_from_mask(segments, src)
    header = conform_source_header(source_images[0])
    seg = hd.seg.Segmentation(
        source_images=[header.dataset, *source_images[1:]],
        pixel_array=frames,
        segmentation_type=(hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="msam",
        software_versions=msam_version(),
        device_serial_number=device_serial_number,
        content_label="MSAM",
        content_description="Lesion segmentation by msam",
        series_description=series_description,
        transfer_syntax_uid=transfer_syntax_uid,
        omit_empty_frames=True,
        specific_character_set=None,  # chosen below, once all text is known
    )
    notes = header.warnings(seg, "DICOM-SEG")
    charset_note = apply_character_set(seg, source_images[0].get("SpecificCharacterSet"), "DICOM-SEG")
    out = Path(path)
    seg.save_as(out)
    report(notes + ([charset_note] if charset_note else []), warnings)
    logger.info("DICOM-SEG written: %d segment(s), %d frame(s)", len(present), int(seg.NumberOfFrames))
    return out


def _codes_for(label: int, codes: Mapping[int, tuple[Code, Code]] | tuple[Code, Code] | None) -> tuple[Code, Code]:
    if codes is None:
        return DEFAULT_CATEGORY, DEFAULT_TYPE
    if isinstance(codes, tuple):
        return codes
    return codes.get(label, (DEFAULT_CATEGORY, DEFAULT_TYPE))


def label_of_segment(tracking_id: str | None, segment_number: int) -> int:
    """The mask label a segment was written from (its segment number if not written by msam)."""
    match = _TRACKING_RE.match(tracking_id or "")
    return int(match.group(1)) if match else segment_number


def read_seg(path: str | Path, source: Volume, *, tol_voxel: float = 1e-3) -> np.ndarray:
    """Read a DICOM-SEG back as a label mask on ``source``'s grid (``source.array`` layout).

    The SEG is placed by its own geometry: every frame's Image Position (Patient), the shared
    Image Orientation (Patient) and Pixel Spacing (all **LPS**) are mapped into ``source``'s voxel
    grid; the SEG's source references are not trusted for placement. Labels are restored from the
    segments' Tracking IDs written by :func:`write_seg` (segment numbers otherwise).

    Raises:
        InvalidVolume: not a SEG, another frame of reference, or a grid that does not coincide
            with ``source``'s voxels (within ``tol_voxel``).
    """
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001
        raise InvalidVolume(f"not a readable DICOM Segmentation ({type(exc).__name__}: {str(exc)[:200]})") from None
    for_uid = source.meta.get("frame_of_reference_uid")
    if for_uid and str(seg.FrameOfReferenceUID) != for_uid:
        raise InvalidVolume("the segmentation is in another frame of reference than the image")
    labels_of = {
        int(item.SegmentNumber): label_of_segment(item.get("TrackingID"), int(item.SegmentNumber))
        for item in seg.SegmentSequence
    }
    out = np.zeros(source.shape, dtype=np.uint16)
    if int(seg.get("NumberOfFrames", 0) or 0) == 0:
        return out
    volume = seg.get_volume(combine_segments=True, relabel=False, dtype=np.uint16)
    data = np.asarray(volume.array)
    nz = np.argwhere(data > 0)  # (slice, row, column) indices of the SEG volume
    if nz.size == 0:
        return out
    lps = nz @ np.asarray(volume.affine)[:3, :3].T + np.asarray(volume.affine)[:3, 3]
    inv = np.linalg.inv(volume_affine_lps(source))
    ijk = lps @ inv[:3, :3].T + inv[:3, 3]
    rounded = np.rint(ijk)
    if np.max(np.abs(ijk - rounded)) > tol_voxel:
        raise InvalidVolume("the segmentation grid does not coincide with the image voxels")
    idx = rounded.astype(np.int64)
    if np.any(idx < 0) or np.any(idx >= np.array(source.shape)):
        raise InvalidVolume("the segmentation extends outside the image")
    lut = np.zeros(max(labels_of) + 1, dtype=np.uint16)
    for number, label in labels_of.items():
        lut[number] = label
    out[idx[:, 0], idx[:, 1], idx[:, 2]] = lut[data[nz[:, 0], nz[:, 1], nz[:, 2]]]
    return out
