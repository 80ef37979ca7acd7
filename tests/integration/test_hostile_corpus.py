"""The hostile/broken input corpus (tests/integration/corpus) against the real
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
            # no server path in any message (decoders quote the files they were given)
            assert str(storage) not in error["message"] and "/staging/" not in error["message"], (name, error)
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


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


#: What a bomb may add to the API's peak resident memory: the bounded readers stay far below it;
#: expanding any of these bombs (1 GiB each) would pass it many times over.
BOMB_RSS_BOUND_MB = 100


@pytest.mark.parametrize("bomb", ["NRRD gzip", "NRRD bzip2", "NIfTI gzip", "DICOM deflate"])
def test_a_decompression_bomb_leaves_the_api_memory_bounded(service: Service, tmp_path: Path, bomb: str) -> None:
    """Each bomb holds 1 GiB of zeros behind a header declaring a few voxels. The API answers in
    seconds and its peak RSS (VmHWM, reset before the request) grows by less than
    BOMB_RSS_BOUND_MB."""
    from tests.integration.corpus.hostile import deflated_dicom_bomb, nifti_gz_bomb, nrrd_bomb

    name, data = {
        "NRRD gzip": ("b.nrrd", lambda: nrrd_bomb("gzip", 1 << 30)),
        "NRRD bzip2": ("b.nrrd", lambda: nrrd_bomb("bzip2", 1 << 30)),
        "NIfTI gzip": ("b.nii.gz", lambda: nifti_gz_bomb(1 << 30)),
        "DICOM deflate": ("b.dcm", lambda: deflated_dicom_bomb(tmp_path, 1 << 30)),
    }[bomb]
    payload = data()
    assert len(payload) < 2 << 20  # a small upload
    assert service.api is not None
    pid = service.api.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _vm_kib(pid, "VmRSS")
    t0 = time.monotonic()
    with service.client() as c:
        r = c.post("/volumes", files={"image": (name, payload)})
    seconds = time.monotonic() - t0
    grew_mb = (_vm_kib(pid, "VmHWM") - before) / 1024
    if bomb == "NIfTI gzip":  # a valid 4x4x4 image: nibabel reads its 128 bytes, never the rest
        assert r.status_code == 201, r.text
    else:
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_volume", r.text
    assert grew_mb < BOMB_RSS_BOUND_MB, (bomb, grew_mb)
    assert seconds < 10, (bomb, seconds)
