"""The worker's result writing: each format stands alone. A source attribute DICOM refuses is a
warning in the job, not a failure; a fault in one writer costs that format only (the others,
NIfTI and PNG included, are kept); a stop (cancel, time limit) still stops."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from msam_core.io.dicom import read_series
from msam_core.io.volume import Volume
from msam_service.contract import result_key
from msam_service.storage import make_storage
from tests.unit.io.dicom_synth import asymmetric_mask, make_ct_series
from worker.job import JobCanceled, write_results

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

MODEL = SimpleNamespace(name="msam_test", version="0.0.0+test")


def _dicom(tmp_path: Path, **changes: str) -> Volume:
    series = make_ct_series(tmp_path / "ct", write=False)
    (tmp_path / "ct").mkdir(parents=True, exist_ok=True)
    for path, ds in zip(series.paths, series.datasets):
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return read_series(tmp_path / "ct")


def _rt(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(storage=make_storage(tmp_path / "storage"))


def test_a_malformed_patient_attribute_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    volume = _dicom(tmp_path, PatientBirthDate="19700132", PatientSex="X")
    rt = _rt(tmp_path)
    written, errors, warnings = write_results(rt, "job1", asymmetric_mask(volume.shape), volume,
                                              {1: "Läsion 腫瘍"}, MODEL)
    assert sorted(written) == ["dicom-seg", "nifti", "png", "rtstruct"] and errors == {}
    assert warnings == [
        "PatientBirthDate in the source is not a valid date (DA) and was left empty in the DICOM-SEG",
        "PatientSex in the source is not one of M, F, O and was left empty in the DICOM-SEG",
        "PatientBirthDate in the source is not a valid date (DA) and was left empty in the RTSTRUCT",
        "PatientSex in the source is not one of M, F, O and was left empty in the RTSTRUCT",
    ]
    assert not any("19700132" in w for w in warnings)  # attribute names, never patient values
    seg = pydicom.dcmread(rt.storage.path("jobs/job1/seg.dcm"))
    assert seg.PatientBirthDate == "" and seg.SegmentSequence[0].SegmentLabel == "Läsion 腫瘍"


def test_a_fault_in_one_writer_keeps_the_other_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = _dicom(tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a fault in the RTSTRUCT writer")

    monkeypatch.setattr("msam_core.io.rtstruct.write_rtstruct", broken)
    rt = _rt(tmp_path)
    written, errors, _ = write_results(rt, "job2", asymmetric_mask(volume.shape), volume, {}, MODEL)
    assert sorted(written) == ["dicom-seg", "nifti", "png"]
    assert set(errors) == {"rtstruct"} and "RuntimeError" in errors["rtstruct"]
    assert "a fault in the RTSTRUCT writer" not in errors["rtstruct"]  # the message may hold anything
    for name in written:
        assert rt.storage.exists(result_key("job2", name))
    assert not rt.storage.exists("jobs/job2/rtstruct.dcm")


def test_a_stop_inside_a_writer_still_stops_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = _dicom(tmp_path)

    def canceled(*args: object, **kwargs: object) -> None:
        raise JobCanceled()

    monkeypatch.setattr("msam_core.io.seg.write_seg", canceled)
    with pytest.raises(JobCanceled):
        write_results(_rt(tmp_path), "job3", asymmetric_mask(volume.shape), volume, {}, MODEL)


def test_when_no_format_can_be_written_the_fault_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dicom = _dicom(tmp_path)
    volume = Volume(dicom.array, dicom.affine, meta={"format": "nifti"})

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("msam_core.io.nifti.save_mask_nifti", broken)
    monkeypatch.setattr("msam_core.io.preview.save_preview", broken)
    with pytest.raises(OSError, match="disk full"):  # the job fails internal_error, as before
        write_results(_rt(tmp_path), "job4", asymmetric_mask(volume.shape), volume, {}, MODEL)


def test_the_job_says_which_segment_each_lesion_is_when_an_earlier_lesion_is_empty(tmp_path: Path) -> None:
    """DICOM numbers a SEG's segments 1..n without gaps: with lesion 1 empty, lesion 2 is segment 1
    and lesion 3 segment 2, as the SEG's own tracking IDs say; without a SEG there are none."""
    from worker.job import segment_numbers

    volume = _dicom(tmp_path)
    labels = asymmetric_mask(volume.shape).astype("uint8")
    labels[labels > 0] = 2
    labels[0, 0, :] = 3
    rt = _rt(tmp_path)
    written, _, _ = write_results(rt, "job5", labels, volume, {2: "second", 3: "third"}, MODEL)
    counts = {label: int((labels == label).sum()) for label in (1, 2, 3)}
    numbers = segment_numbers(counts, written)
    assert numbers == {2: 1, 3: 2}
    seg = pydicom.dcmread(rt.storage.path("jobs/job5/seg.dcm"))
    assert {int(s.SegmentNumber): (s.TrackingID, s.SegmentLabel) for s in seg.SegmentSequence} == {
        1: ("msam lesion 2", "second"), 2: ("msam lesion 3", "third")}
    assert segment_numbers(counts, ["nifti", "png"]) == {}
