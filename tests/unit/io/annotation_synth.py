"""A radiologist's line measurements as a workstation stores them (written with highdicom): a
TID 1500 SR with a planar ROI group (a two-point POLYLINE SCOORD on one image + its Long Axis in
mm), a TID 1500 SR with a SCOORD3D polyline, and a GSPS with a PIXEL polyline on one image."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes


def _observer() -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_person_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^Test")))


def recist_sr(image: Dataset, pixels: list[tuple[float, float]], length_mm: float, path: Path,
              images: list[Dataset] | None = None) -> Path:
    """An SR whose one planar group holds the line ``pixels`` (column, row) on ``image`` and its
    reported Long Axis."""
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                               graphic_data=np.asarray(pixels, dtype=np.float64),
                               source_image=hd.sr.SourceImageForRegion.from_source_image(image))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="target lesion 1"),
        referenced_region=region, finding_type=codes.SCT.Neoplasm,
        measurements=[hd.sr.Measurement(name=codes.SCT.LongAxis, value=length_mm, unit=codes.UCUM.Millimeter)])
    report = hd.sr.MeasurementReport(observation_context=_observer(),
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(evidence=images or [image], content=report[0], series_instance_uid=hd.UID(),
                                 series_number=50, sop_instance_uid=hd.UID(), instance_number=1,
                                 manufacturer="test workstation", is_complete=True)
    sr.save_as(path)
    return path


def recist_sr_3d(image: Dataset, lps: list[tuple[float, float, float]], path: Path) -> Path:
    """An SR whose one planar group holds a SCOORD3D polyline (LPS mm) in ``image``'s frame of reference."""
    region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
                                 graphic_data=np.asarray(lps, dtype=np.float64),
                                 frame_of_reference_uid=str(image.FrameOfReferenceUID))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="target lesion 3D"),
        referenced_region=region, finding_type=codes.SCT.Neoplasm)
    report = hd.sr.MeasurementReport(observation_context=_observer(),
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(evidence=[image], content=report[0], series_instance_uid=hd.UID(), series_number=51,
                                 sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test workstation",
                                 is_complete=True)
    sr.save_as(path)
    return path


def line_gsps(image: Dataset, pixels: list[tuple[float, float]], path: Path,
              images: list[Dataset] | None = None) -> Path:
    """A GSPS with one PIXEL polyline on ``image``."""
    layer = hd.pr.GraphicLayer(layer_name="MEASUREMENTS", order=1)
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[image], graphic_layer=layer,
        graphic_objects=[hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                                             graphic_data=np.asarray(pixels, dtype=np.float64),
                                             units=hd.pr.AnnotationUnitsValues.PIXEL)])
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images or [image], series_instance_uid=hd.UID(), series_number=60,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test workstation",
        manufacturer_model_name="viewer", software_versions="1", device_serial_number="1", content_label="LINES",
        graphic_annotations=[annotation], graphic_layers=[layer])
    pr.save_as(path)
    return path
