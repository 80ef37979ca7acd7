"""Issue #7: the hostile/broken input corpus (tests/integration/corpus) against the real
service: every case is a clear 4xx or a job that ends with a message - never a 5xx or a hang;
afterwards the service is ready, a good job succeeds, and nothing was written outside the
storage directory (temp folder empty, zip-slip targets absent, staging empty)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import prompts
from tests.integration.corpus.hostile import ZIP_SLIP_TARGETS, cases
from tests.integration.harness import Service

pytestmark = pytest.mark.slow


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def test_hostile_corpus_gets_4xx_and_the_service_stays_healthy(service: Service, ct_nifti: Path,
                                                               tmp_path: Path) -> None:
    storage = Path(service.env["MSAM_STORAGE_DIR"])
    service_tmp = Path(service.env["TMPDIR"])
    tmp_before = _files(service_tmp)
    accepted: list[tuple[str, str]] = []
    with httpx.Client(base_url=service.api_url, timeout=30) as c:  # a hang fails the case at 30 s
        for name, method, path, kw, code, fragment in cases(tmp_path / "corpus", ct_nifti.read_bytes()):
            t0 = time.monotonic()
            r = c.request(method, path, **kw)
            assert r.status_code < 500, (name, r.status_code, r.text, service.logs())
            assert time.monotonic() - t0 < 20, name
            if r.status_code == 202:  # well-formed enough to queue: the job must end with a message
                assert code is None, (name, r.text)
                accepted.append((name, r.json()["job_id"]))
                continue
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            error = r.json()["error"]
            assert error["message"] and (code is None or error["code"] == code), (name, error)
            assert fragment in error["message"], (name, error)
    for name, job_id in accepted:
        job = service.wait_job(job_id, timeout=90)
        assert job["status"] in ("succeeded", "failed"), (name, job)
        if job["status"] == "failed":
            assert job["error"]["message"] and job["error"]["code"] != "internal_error", (name, job)

    # healthy: processes up, ready, a good job runs
    assert service.api is not None and service.api.poll() is None
    assert all(p.poll() is None for p in service.workers.values())
    with service.client() as c:
        assert c.get("/readyz").status_code == 200
        with open(ct_nifti, "rb") as f:
            r = c.post("/segment", files={"image": ("ct.nii.gz", f)}, data={"prompts": prompts((22, 20, 12))})
    assert service.wait_job(r.json()["job_id"])["status"] == "succeeded"

    # nothing outside the storage directory; no upload left half-staged
    for target in ZIP_SLIP_TARGETS:
        for base in (Path("/"), storage.parent, storage, storage / "staging", Path("/tmp")):
            assert not (base / target).exists(), base / target
            assert not (base / Path(target).name).exists(), base / Path(target).name
    assert _files(service_tmp) <= tmp_before, _files(service_tmp) - tmp_before
    assert not any((storage / "staging").iterdir())
    # no patient data reached a log (the corpus' DICOM files carry a patient name and ID)
    logs = service.logs(tail=0)
    assert "Synthetic^Patient" not in logs and "SYN0001" not in logs
