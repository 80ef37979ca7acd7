"""NIfTI and DICOM uploads through HTTP, the queue and a real worker to every result format."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.integration.conftest import prompts
from tests.integration.harness import Service
from tests.unit.io.dicom_synth import make_ct_series

pytestmark = pytest.mark.slow


def test_nifti_upload_to_nifti_and_png(service: Service, ct_nifti: Path, tmp_path: Path) -> None:
    with service.client() as c:
        with open(ct_nifti, "rb") as f:
            r = c.post("/segment", files={"image": ("ct.nii.gz", f)}, data={"prompts": prompts((22, 20, 12))})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["status_url"].endswith(f"/jobs/{accepted['job_id']}")
        job = service.wait_job(accepted["job_id"])
        assert job["status"] == "succeeded", (job, service.logs())
        assert job["progress"] == 1.0 and job["attempts"] == 1
        for stage in ("queue", "load", "preprocess", "encode", "decode", "write", "total"):
            assert job["timings"][stage] is not None and job["timings"][stage] >= 0, stage
        assert set(job["results"]) == {"nifti", "png"}
        assert "DICOM input" in job["unavailable_results"]["dicom-seg"]

        r = c.get(f"/jobs/{accepted['job_id']}/result", params={"format": "nifti"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
        out = tmp_path / "mask.nii.gz"
        out.write_bytes(r.content)
        mask, src = nib.load(str(out)), nib.load(str(ct_nifti))
        assert mask.shape == src.shape
        np.testing.assert_array_equal(mask.affine, src.affine)  # the input's geometry, exactly
        assert int(mask.header["qform_code"]) == int(src.header["qform_code"])
        labels = np.asarray(mask.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
        assert int((labels == 1).sum()) == job["lesions"][0]["voxels"]
        # the measurements in the status are those of the mask delivered, on the input's geometry
        from msam_core.io.load import load_volume
        from msam_core.measure import measure_lesion

        expected = measure_lesion(labels == 1, load_volume(ct_nifti), hounsfield=job["intensity"]["hu"])
        assert job["lesions"][0]["measurements"] == expected.to_json()
        assert job["timings"]["measure"] >= 0
        assert "DICOM input" in job["unavailable_results"]["sr"]

        r = c.get(f"/jobs/{accepted['job_id']}/result", params={"format": "png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size[0] > 0
        for fmt in ("dicom-seg", "mha"):  # not written for this input: why, and what there is instead
            r = c.get(f"/jobs/{accepted['job_id']}/result", params={"format": fmt})
            assert r.status_code == 422 and r.json()["error"]["message"].endswith("; this job has: nifti, png"), r.text

        r = c.get(f"/jobs/{accepted['job_id']}/result", params={"format": "dicom-seg"})
        assert r.status_code == 422 and "DICOM input" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("dicom")
    return make_ct_series(folder, shape=(48, 40, 16), spacing=(1.2, 1.1, 2.5), write_order="shuffle")


def _check_dicom_job(service: Service, job_id: str, series, tmp_path: Path) -> None:
    from msam_core.io.dicom import read_series
    from msam_core.io.rtstruct import read_rtstruct
    from msam_core.io.seg import read_seg

    job = service.wait_job(job_id)
    assert job["status"] == "succeeded", (job, service.logs())
    assert set(job["results"]) == {"dicom-seg", "rtstruct", "nifti", "png", "sr"}, job
    assert job["lesions"][0]["segment_number"] == 1
    source = read_series(series.paths)
    with service.client() as c:
        seg_bytes = c.get(f"/jobs/{job_id}/result").content  # default for DICOM: dicom-seg
        nifti_bytes = c.get(f"/jobs/{job_id}/result", params={"format": "nifti"}).content
        rt = c.get(f"/jobs/{job_id}/result", params={"format": "rtstruct"})
        sr = c.get(f"/jobs/{job_id}/result", params={"format": "sr"})
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
    (tmp_path / "sr.dcm").write_bytes(sr.content)
    (tmp_path / "seg.dcm").write_bytes(seg_bytes)
    (tmp_path / "mask.nii.gz").write_bytes(nifti_bytes)
    (tmp_path / "rt.dcm").write_bytes(rt.content)
    assert rt.headers["content-type"] == "application/dicom"

    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.FrameOfReferenceUID == series.for_uid and seg.StudyInstanceUID == series.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert seg.SegmentSequence[0].SegmentLabel == "tumour A"

    mask_nii = nib.load(str(tmp_path / "mask.nii.gz"))
    labels = np.asarray(mask_nii.dataobj)
    np.testing.assert_allclose(mask_nii.affine, source.affine, atol=1e-4)  # reconstructed grid, RAS
    assert labels.shape == source.shape and labels.sum() > 0
    # the SEG, placed by its own LPS geometry, is the NIfTI mask voxel for voxel
    np.testing.assert_array_equal(read_seg(tmp_path / "seg.dcm", source), labels)
    np.testing.assert_array_equal(read_rtstruct(tmp_path / "rt.dcm", source), labels)
    # the SR: valid, its one group referencing the SEG's segment, with the status' numbers
    from msam_core.io.sr import read_sr
    from tests.unit.io.dicom_synth import dciodvfy_errors

    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    (group,) = read_sr(tmp_path / "sr.dcm")
    measured = job["lesions"][0]["measurements"]
    assert group.seg_instance_uid == seg.SOPInstanceUID and group.segment_number == 1
    assert group.tracking_uid == seg.SegmentSequence[0].TrackingUID and group.source_series_uid == series.series_uid
    assert group.values["volume_ml"] == pytest.approx(measured["volume_ml"], abs=1e-3)
    assert group.values["long_axis_mm"] == pytest.approx(measured["long_axis"]["length_mm"], abs=0.01)
    assert group.values["short_axis_mm"] == pytest.approx(measured["short_axis"]["length_mm"], abs=0.01)


def test_a_lesion_that_comes_back_empty_is_a_warning(service: Service, ct_nifti: Path) -> None:
    """Two lesions prompted alike: a voxel goes to the lesion whose logit is larger, so the second
    gets none; the job succeeds and says which lesion is empty instead of leaving it to be found."""
    lesion = {"positive": [[22, 20, 12]]}
    with service.client() as c, open(ct_nifti, "rb") as f:
        r = c.post("/segment", files={"image": ("ct.nii.gz", f)},
                   data={"prompts": json.dumps({"lesions": [lesion, lesion]})})
        assert r.status_code == 202, r.text
        job = service.wait_job(r.json()["job_id"])
    assert job["status"] == "succeeded", (job, service.logs())
    assert job["lesions"][0]["voxels"] > 0 and job["lesions"][1]["voxels"] == 0
    assert [les["segment_number"] for les in job["lesions"]] == [None, None]  # no SEG for a NIfTI
    assert [w for w in job["warnings"] if "is empty" in w] == [
        "lesion 2 is empty: nothing was segmented at its prompts; put a positive click on the lesion itself or "
        "add clicks"]


def test_dicom_files_upload_to_seg_rtstruct_nifti(service: Service, dicom_series, tmp_path: Path) -> None:
    files = [("image", (f"IM{n}", open(p, "rb"), "application/dicom")) for n, p in enumerate(dicom_series.paths)]
    try:
        with service.client() as c:
            r = c.post("/segment", files=files,
                       data={"prompts": prompts((24, 20, 8), label="tumour A")})
    finally:
        for _, (_, f, _) in files:
            f.close()
    assert r.status_code == 202, r.text
    _check_dicom_job(service, r.json()["job_id"], dicom_series, tmp_path)
    # no patient data in any log of the API, the worker or Redis
    logs = service.logs(tail=0)
    assert "job " in logs  # the worker did log
    assert "Synthetic^Patient" not in logs and "SYN0001" not in logs and "Synthetic" not in logs


def test_line_prompt_in_world_space_segments_and_reports_the_line(service: Service, ct_nifti: Path) -> None:
    """A RECIST line in LPS mm across the blob (its long axis in slice k = 12): the job segments
    the lesion and reports the line's length beside the measured long axis."""
    src = nib.load(str(ct_nifti))
    ends_ras = nib.affines.apply_affine(src.affine, [[17, 20, 12], [27, 20, 12]])
    ends_lps = (ends_ras * [-1, -1, 1]).tolist()
    with service.client() as c:
        with open(ct_nifti, "rb") as f:
            r = c.post("/segment", files={"image": ("ct.nii.gz", f)},
                       data={"prompts": json.dumps({"space": "LPS", "lesions": [{"line": ends_lps}]})})
        assert r.status_code == 202, r.text
    job = service.wait_job(r.json()["job_id"])
    assert job["status"] == "succeeded", (job, service.logs())
    (lesion,) = job["lesions"]
    assert lesion["reference_line"]["source"] == "request"
    assert lesion["reference_line"]["length_mm"] == pytest.approx(10 * 1.2, abs=0.01)
    assert np.allclose(lesion["reference_line"]["start_lps"], ends_lps[0], atol=0.01)
    assert lesion["voxels"] > 0 and lesion["measurements"]["long_axis"]["length_mm"] > 0


def test_dicom_zip_volume_then_json_segment(service: Service, dicom_series, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, p in enumerate(dicom_series.paths):
            z.write(p, f"series/{n:03d}.dcm")
    with service.client() as c:
        r = c.post("/volumes", files={"image": ("study.zip", buf.getvalue(), "application/zip")})
        assert r.status_code == 201, r.text
        vol = r.json()
        assert vol["format"] == "dicom" and vol["shape"] == [48, 40, 16]
        assert vol["series_instance_uid"] == dicom_series.series_uid and vol["modality"] == "CT"
        r = c.post("/segment", json={"volume_id": vol["volume_id"], "prompts": {
            "space": "voxel", "lesions": [{"positive": [[24, 20, 8]], "label": "tumour A"}]}})
        assert r.status_code == 202, r.text
    _check_dicom_job(service, r.json()["job_id"], dicom_series, tmp_path)
