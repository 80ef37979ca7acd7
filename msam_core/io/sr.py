"""Lesion measurements as a DICOM Comprehensive 3D SR following TID 1500 (Measurement Report),
written with highdicom's ``sr`` module; and reading them back.

One volumetric measurement group (TID 1411) per lesion. Each group references its segment of
the DICOM-SEG written for the same mask (:func:`msam_core.io.seg.write_seg`; the SEG's SOP
Instance UID and segment number, with the source series) and carries the SEG segment's Tracking
UID, so a viewer pairs the numbers with the outline. Measurements, coded with the standard
concepts (SNOMED CT names, UCUM units):

=====================  ===========================  =============================
volume                 SCT 118565006 Volume         UCUM ``ml``
RECIST long axis       SCT 103339001 Long axis      UCUM ``mm``
RECIST short axis      SCT 103340004 Short axis     UCUM ``mm``
3D diameter            SCT 81827009 Diameter        UCUM ``mm``, derivation SCT Maximum
mean intensity (HU)    DCM 112031 Attenuation       UCUM ``[hnsf'U]``, derivation SCT Mean
                       Coefficient
mean intensity (MR)    DCM 110852 MR signal         UCUM ``1``, derivation SCT Mean
                       intensity
=====================  ===========================  =============================

The finding is SCT 108369006 Neoplasm, found by the device observer ``msam``. Lengths are the
ones :mod:`msam_core.measure` reports. The RECIST axes also name the source image their slice is
(TID 300's source image for the measurement: the SOP Instance, and frame of a multi-frame
instance), so a viewer can open the image they were measured on; their endpoints stay in the JSON
report and job status (TID 1411's measurements take no coordinates).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from msam_core.errors import InvalidVolume, UnsupportedRequest
from msam_core.io.dicom_text import apply_character_set, conform_source_header
from msam_core.io.seg import label_of_segment, long_string, msam_version, report, source_of
from msam_core.io.volume import Volume
from msam_core.measure import Axis, LesionMeasurements

__all__ = ["SrLesion", "read_sr", "write_sr"]

logger = logging.getLogger(__name__)

ML = Code("ml", "UCUM", "milliliter")
MM = codes.UCUM.Millimeter
HU = codes.UCUM.HounsfieldUnit
NO_UNITS = Code("1", "UCUM", "no units")
MR_SIGNAL = Code("110852", "DCM", "MR signal intensity")
MAXIMUM = Code("56851009", "SCT", "Maximum")
#: procedure reported (CID 100) by modality
PROCEDURES = {"CT": Code("25045-6", "LN", "CT unspecified body region"),
              "MR": Code("25056-3", "LN", "MRI unspecified body region")}
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class SrLesion:
    """One measurement group as read back by :func:`read_sr`."""

    tracking_id: str
    tracking_uid: str
    seg_instance_uid: str
    segment_number: int
    source_series_uid: str
    values: dict[str, float]  # "volume_ml", "long_axis_mm", "short_axis_mm", "max_diameter_3d_mm", "mean"
    units: dict[str, str]
    #: by value name: the source image a value was measured on (SOP Instance UID, frame or None)
    images: dict[str, tuple[str, int | None]]


def _measurement(name: Code, value: float, unit: Code, derivation: Code | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 3), unit=unit, derivation=derivation)


def _length(name: Code, axis: Axis, source: Volume, derivation: Code | None = None) -> hd.sr.Measurement:
    """A length, with the source image it was measured on when it lies in one (RECIST axes)."""
    images = None
    if axis.slice_sop_instance_uid:
        frames = [axis.slice_frame_number] if axis.slice_frame_number is not None else None
        images = [hd.sr.SourceImageForMeasurement(str(source.meta["sop_class_uid"]), axis.slice_sop_instance_uid,
                                                  referenced_frame_numbers=frames)]
    return hd.sr.Measurement(name=name, value=round(float(axis.length_mm), 3), unit=MM, derivation=derivation,
                             referenced_images=images)


def write_sr(
    measurements: Mapping[int, LesionMeasurements],
    source: Volume,
    seg_path: str | Path,
    path: str | Path,
    *,
    algorithm_name: str = "msam",
    algorithm_version: str | None = None,
    series_number: int = 902,
    warnings: list[str] | None = None,
) -> Path:
    """Write the measurements of the lesions of ``seg_path`` as a TID 1500 Comprehensive 3D SR.

    Args:
        measurements: mask label -> its measurements (:func:`msam_core.measure.measure_lesion`).
        source: the DICOM volume the mask was computed on.
        seg_path: the DICOM-SEG written for the same mask (its segments carry the labels in their
            Tracking IDs, ``"msam lesion <label>"``); referenced, and included as evidence.
        path: output file.
        algorithm_name, algorithm_version: the algorithm identification of every group.
        warnings: receives one sentence per source attribute left empty (see
            :func:`~msam_core.io.seg.write_seg`); logged when not given.

    Raises:
        UnsupportedRequest: ``source`` is not DICOM, or no lesion has measurements.
        InvalidVolume: ``seg_path`` is not a segmentation of ``source``'s series.
    """
    src = source_of(source, "DICOM SR")
    seg = pydicom.dcmread(seg_path)
    if str(seg.get("Modality", "")) != "SEG":
        raise InvalidVolume("the SR must reference a DICOM-SEG, and the file given is not one")
    if str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) != source.meta.get("series_instance_uid"):
        raise InvalidVolume("the DICOM-SEG does not segment the series the measurements were made on")
    segments = {label_of_segment(item.get("TrackingID"), int(item.SegmentNumber)): item for item in seg.SegmentSequence}
    header = conform_source_header(src.datasets[0])
    algorithm = hd.sr.AlgorithmIdentification(name=long_string(algorithm_name),
                                              version=long_string(algorithm_version or msam_version()))
    modality = (source.modality or "").upper()
    groups = []
    for label, m in sorted(measurements.items()):
        item = segments.get(label)
        if item is None or m is None:
            continue
        values = [
            _measurement(codes.SCT.Volume, m.volume_ml, ML),
            _length(codes.SCT.LongAxis, m.long_axis, source),
            _length(codes.SCT.ShortAxis, m.short_axis, source),
            _length(codes.SCT.Diameter, m.max_diameter_3d, source, MAXIMUM),
        ]
        if m.intensity is not None and m.intensity.unit == "HU":
            values.append(_measurement(codes.DCM.AttenuationCoefficient, m.intensity.mean, HU, codes.SCT.Mean))
        elif m.intensity is not None and modality == "MR":
            values.append(_measurement(MR_SIGNAL, m.intensity.mean, NO_UNITS, codes.SCT.Mean))
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=int(item.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(str(source.meta["series_instance_uid"])))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=str(item.TrackingID)),
            referenced_segment=referenced,
            finding_type=codes.SCT.Neoplasm,
            algorithm_id=algorithm,
            measurements=values,
        ))
    if not groups:
        raise UnsupportedRequest("no lesion has measurements (every mask is empty): there is nothing to report in an SR")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="msam", model_name=long_string(algorithm_name)))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURES.get(modality, IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[header.dataset, *src.datasets[1:], seg],
        content=content[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="msam",
        is_complete=True,
        series_description="msam lesion measurements",
    )
    notes = header.warnings(sr, "DICOM SR")
    charset_note = apply_character_set(sr, src.datasets[0].get("SpecificCharacterSet"), "DICOM SR")
    out = Path(path)
    sr.save_as(out)
    report(notes + ([charset_note] if charset_note else []), warnings)
    logger.info("DICOM SR written: %d measurement group(s)", len(groups))
    return out


_NAMES = {("SCT", "118565006"): "volume_ml", ("SCT", "103339001"): "long_axis_mm",
          ("SCT", "103340004"): "short_axis_mm", ("SCT", "81827009"): "max_diameter_3d_mm",
          ("DCM", "112031"): "mean", ("DCM", "110852"): "mean"}


def read_sr(path: str | Path) -> list[SrLesion]:
    """The volumetric measurement groups of a TID 1500 SR (as :func:`write_sr` writes them),
    parsed by highdicom: tracking identifiers, the referenced SEG segment and series, and the
    values by name (``volume_ml``, ``long_axis_mm``, ``short_axis_mm``, ``max_diameter_3d_mm``,
    ``mean``)."""
    sr = hd.sr.srread(path)
    content = hd.sr.MeasurementReport.from_sequence(sr.content)
    out: list[SrLesion] = []
    for group in content.get_volumetric_roi_measurement_groups():
        ref = group.referenced_segment
        if ref is None:
            continue
        values: dict[str, float] = {}
        units: dict[str, str] = {}
        images: dict[str, tuple[str, int | None]] = {}
        for m in group.get_measurements():
            key = _NAMES.get((m.name.scheme_designator, m.name.value))
            if key is not None:
                values[key] = float(m.value)
                units[key] = str(m.unit.value)
                for image in m.referenced_images or []:
                    frames = image.referenced_frame_numbers
                    images[key] = (str(image.referenced_sop_instance_uid), int(frames[0]) if frames else None)
        series = ref.source_series_for_segmentation
        out.append(SrLesion(
            tracking_id=str(group.tracking_identifier), tracking_uid=str(group.tracking_uid),
            seg_instance_uid=str(ref.referenced_sop_instance_uid),
            segment_number=int((ref.referenced_segment_numbers or [0])[0]),
            source_series_uid=str(series.value) if series is not None else "",
            values=values, units=units, images=images))
    return out
