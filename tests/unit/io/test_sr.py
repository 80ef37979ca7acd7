"""The measurement SR (TID 1500): written by highdicom, checked by dciodvfy, read back by highdicom
with the same numbers, and its references resolving to the SEG's segments and the source images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from msam_core.errors import UnsupportedRequest
from msam_core.io.dicom import read_series
from msam_core.io.seg import write_seg
from msam_core.io.sr import read_sr, write_sr
from msam_core.io.volume import Volume
from msam_core.measure import measure_labels
from tests.unit.io.dicom_synth import dciodvfy_errors, make_ct_series, rotation


@pytest.mark.parametrize("oblique", [False, True])
def test_sr_round_trip(tmp_path: Path, oblique: bool) -> None:
    r = rotation((1, 0.4, 0), 20) if oblique else np.eye(3)
    series = make_ct_series(tmp_path / "ct", shape=(40, 36, 12), spacing=(0.8, 0.7, 2.5), write_order="shuffle",
                            row_dir=tuple(r[:, 0]), col_dir=tuple(r[:, 1]))
    volume = read_series(series.paths)
    labels = np.zeros(volume.shape, np.uint8)
    labels[10:20, 10:18, 3:7] = 1
    labels[25:30, 20:30, 5:9] = 3  # labels need not be consecutive
    write_seg(labels, volume, tmp_path / "seg.dcm")
    measured = measure_labels(labels, volume)
    write_sr(measured, volume, tmp_path / "seg.dcm", tmp_path / "sr.dcm", algorithm_name="msam_test")

    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == series.study_uid and sr.PatientID == series.datasets[0].PatientID

    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    groups = read_sr(tmp_path / "sr.dcm")
    assert [g.tracking_id for g in groups] == ["msam lesion 1", "msam lesion 3"]
    for group, label in zip(groups, (1, 3)):
        m = measured[label]
        # the reference resolves: the SEG instance, the segment of this label, its tracking UID
        assert group.seg_instance_uid == seg.SOPInstanceUID
        segment = segments[group.segment_number]
        assert segment.TrackingID == f"msam lesion {label}" and segment.TrackingUID == group.tracking_uid
        assert group.source_series_uid == series.series_uid
        assert group.values["volume_ml"] == pytest.approx(m.volume_ml, abs=1e-3)
        assert group.values["long_axis_mm"] == pytest.approx(m.long_axis.length_mm, abs=1e-3)
        assert group.values["short_axis_mm"] == pytest.approx(m.short_axis.length_mm, abs=1e-3)
        assert group.values["max_diameter_3d_mm"] == pytest.approx(m.max_diameter_3d.length_mm, abs=1e-3)
        assert group.values["mean"] == pytest.approx(m.intensity.mean, abs=1e-3)
        assert group.units == {"volume_ml": "ml", "long_axis_mm": "mm", "short_axis_mm": "mm",
                               "max_diameter_3d_mm": "mm", "mean": "[hnsf'U]"}
        # the RECIST axes name the source image they were measured on: one of the series', the
        # one that is their slice; the 3D diameter lies in none
        slice_image = (m.long_axis.slice_sop_instance_uid, None)
        assert group.images == {"long_axis_mm": slice_image, "short_axis_mm": slice_image}
        assert slice_image[0] in {str(d.SOPInstanceUID) for d in series.datasets}
    # the evidence lists every source instance and the SEG
    evidence = {str(i.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert evidence == {str(d.SOPInstanceUID) for d in series.datasets} | {str(seg.SOPInstanceUID)}


def test_sr_refuses_what_it_cannot_report(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct", shape=(20, 16, 6))
    volume = read_series(series.paths)
    labels = np.zeros(volume.shape, np.uint8)
    labels[5:9, 5:9, 2:4] = 1
    write_seg(labels, volume, tmp_path / "seg.dcm")
    with pytest.raises(UnsupportedRequest, match="nothing to report"):
        write_sr({}, volume, tmp_path / "seg.dcm", tmp_path / "sr.dcm")
    nifti_like = Volume(volume.array, volume.affine, modality="CT", meta={"format": "nifti"})
    with pytest.raises(UnsupportedRequest, match="DICOM input"):
        write_sr(measure_labels(labels, volume), nifti_like, tmp_path / "seg.dcm", tmp_path / "sr.dcm")
