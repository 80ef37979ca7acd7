"""DICOM text, source attributes, logs and the embedding cache through the real service (API,
queue, a worker, two tenants):

- a label DICOM refuses is a 422 naming the character and its position; one it accepts comes
  back byte for byte in the DICOM-SEG and the RTSTRUCT (UTF-8 when the source's character set
  cannot hold it), and both pass dciodvfy;
- a source whose PatientBirthDate / PatientSex DICOM refuses still gives every result format,
  with a warning per emptied attribute in GET /jobs/{id};
- no UID of the source series or of the outputs reaches the worker's or the API's log, though
  highdicom logs at INFO there;
- tenant B's job on the same scan with the same click does not hit tenant A's cached embedding.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement

from msam_service.auth import hash_key
from tests.integration.conftest import prompts, service_env
from tests.integration.harness import Service
from tests.unit.io.dicom_synth import dciodvfy_errors, make_ct_series

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")]

A = {"Authorization": "Bearer alpha-key"}
B = {"Authorization": "Bearer beta-key"}
LABEL = "Läsion 腫瘍"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: str, checkpoint: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("text-and-logs")
    env = service_env(tmp, redis_server, checkpoint, MSAM_QUEUE="text-and-logs",
                      MSAM_API_KEYS=f"alpha:{hash_key('alpha-key')},beta:{hash_key('beta-key')}")
    svc = Service(tmp=tmp, redis_url=redis_server, env=env)
    try:
        svc.start_worker("t1")
        svc.start_api()
        yield svc
    finally:
        svc.stop()


def _wait(stack: Service, job_id: str, headers: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with stack.client() as c:
        while time.monotonic() < deadline:
            body = c.get(f"/jobs/{job_id}", headers=headers).json()
            if body.get("status") in ("succeeded", "failed", "canceled"):
                return body
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished after {timeout} s\n{stack.logs()}")


@pytest.mark.parametrize(("label", "says"), [
    ("liver\\lesion", "character 6 of the label is a backslash"),
    ("tumour\tA", "character 7 of the label is the control character U+0009 TAB"),
    ("tumour\x00", "character 7 of the label is the control character U+0000 NULL"),
    ("    ", "the label is empty or only spaces"),
    ("x" * 65, "the label has 65 characters and a DICOM long string (LO) holds at most 64 (from character 65"),
], ids=["backslash", "tab", "nul", "spaces", "65-chars"])
def test_a_label_dicom_refuses_is_a_422_naming_the_character(stack: Service, ct_nifti: Path, label: str,
                                                             says: str) -> None:
    body = {"volume_id": "0" * 32, "prompts": {"lesions": [{"positive": [[1, 2, 3]], "label": label}]}}
    with stack.client() as c:
        r = c.post("/segment", json=body, headers=A)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and "prompts.lesions.0.label" in error["message"], error
        assert says in error["message"], error
        with open(ct_nifti, "rb") as f:  # the upload form applies the same rule
            r = c.post("/segment", files={"image": ("ct.nii.gz", f)},
                       data={"prompts": prompts((22, 20, 12), label=label)}, headers=A)
        assert r.status_code == 422 and says in r.json()["error"]["message"], r.text


@pytest.fixture(scope="module")
def dicom_job(stack: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One DICOM job: a unicode label on a Latin-1 source whose birth date and sex DICOM refuses."""
    tmp = tmp_path_factory.mktemp("dicom-job")
    series = make_ct_series(tmp / "src", shape=(32, 32, 8), write=False)
    (tmp / "src").mkdir(exist_ok=True)
    for path, ds in zip(series.paths, series.datasets):
        ds.PatientBirthDate = "19700132"
        ds.PatientSex = "X"
        ds.save_as(path, enforce_file_format=True)
    files = [("image", (f"IM{n}", p.read_bytes(), "application/dicom")) for n, p in enumerate(series.paths)]
    with stack.client() as c:
        r = c.post("/segment", files=files, data={"prompts": prompts((16, 16, 4), label=LABEL)}, headers=A)
        assert r.status_code == 202, r.text
        job = _wait(stack, r.json()["job_id"], A)
        assert job["status"] == "succeeded", (job, stack.logs())
        outputs = {}
        for fmt in ("dicom-seg", "rtstruct", "sr"):
            got = c.get(f"/jobs/{job['job_id']}/result", params={"format": fmt}, headers=A)
            assert got.status_code == 200, got.text
            outputs[fmt] = tmp / f"{fmt}.dcm"
            outputs[fmt].write_bytes(got.content)
    return {"job": job, "series": series, "outputs": outputs}


def test_a_malformed_patient_attribute_is_a_warning_and_every_format_is_kept(dicom_job: dict[str, Any]) -> None:
    job = dicom_job["job"]
    assert set(job["results"]) == {"dicom-seg", "rtstruct", "nifti", "png", "sr"}, job
    assert job["unavailable_results"] == {}
    assert job["warnings"] == [
        "PatientBirthDate in the source is not a valid date (DA) and was left empty in the DICOM-SEG",
        "PatientSex in the source is not one of M, F, O and was left empty in the DICOM-SEG",
        "PatientBirthDate in the source is not a valid date (DA) and was left empty in the DICOM SR",
        "PatientSex in the source is not one of M, F, O and was left empty in the DICOM SR",
        "PatientBirthDate in the source is not a valid date (DA) and was left empty in the RTSTRUCT",
        "PatientSex in the source is not one of M, F, O and was left empty in the RTSTRUCT",
    ]
    for path in dicom_job["outputs"].values():
        ds = pydicom.dcmread(path)
        assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.PatientID == "SYN0001"


@pytest.mark.parametrize(("fmt", "sequence", "tag"), [("dicom-seg", "SegmentSequence", 0x00620005),
                                                       ("rtstruct", "StructureSetROISequence", 0x30060026)])
def test_a_unicode_label_comes_back_byte_for_byte(dicom_job: dict[str, Any], fmt: str, sequence: str, tag: int) -> None:
    path = dicom_job["outputs"][fmt]
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"  # the source's ISO_IR 100 cannot hold 腫瘍
    raw = ds[sequence][0].get_item(tag)
    assert isinstance(raw, RawDataElement) and bytes(raw.value).rstrip(b" ") == LABEL.encode("utf-8")
    assert ds[sequence][0][tag].value == LABEL
    assert ds.PatientName == "Synthetic^Patient"
    assert dciodvfy_errors(path) == []


def test_no_uid_reaches_the_logs(stack: Service, dicom_job: dict[str, Any]) -> None:
    series = dicom_job["series"]
    uids = {ds.SOPInstanceUID for ds in series.datasets} | {series.series_uid, series.study_uid, series.for_uid}
    for path in dicom_job["outputs"].values():
        out = pydicom.dcmread(path)
        uids |= {out.SOPInstanceUID, out.SeriesInstanceUID}
    worker_log = (stack.tmp / "worker-t1.log").read_text(errors="replace")
    api_log = (stack.tmp / "api.log").read_text(errors="replace")
    # highdicom did log at INFO (the lines that named every source instance), now redacted
    assert 'copy Patient-related attributes from dataset "[uid]"' in worker_log, worker_log[-3000:]
    for uid in uids:
        assert uid not in worker_log and uid not in api_log, uid
    for value in ("19700132", "Synthetic", "SYN0001"):
        assert value not in worker_log and value not in api_log, value


def test_tenants_do_not_share_cached_embeddings(stack: Service, ct_nifti: Path) -> None:
    def run(headers: dict[str, str], volume_id: str) -> dict[str, Any]:
        body = {"volume_id": volume_id, "prompts": {"lesions": [{"positive": [[22, 20, 12]]}]}}
        with stack.client() as c:
            r = c.post("/segment", content=json.dumps(body), headers={**headers, "content-type": "application/json"})
            assert r.status_code == 202, r.text
        job = _wait(stack, r.json()["job_id"], headers)
        assert job["status"] == "succeeded", (job, stack.logs())
        return job

    volumes = {}
    with stack.client() as c:
        for name, headers in (("alpha", A), ("beta", B)):
            with open(ct_nifti, "rb") as f:  # the same scan, uploaded by each tenant
                r = c.post("/volumes", files={"image": ("ct.nii.gz", f)}, headers=headers)
            assert r.status_code == 201 or r.status_code == 200, r.text
            volumes[name] = r.json()["volume_id"]
    first = run(A, volumes["alpha"])
    again = run(A, volumes["alpha"])
    assert (first["cache_hits"], again["cache_hits"], again["encoder_runs"]) == (0, 1, 0)  # the cache works
    other = run(B, volumes["beta"])
    assert other["cache_hits"] == 0 and other["encoder_runs"] == 1  # but not across tenants
