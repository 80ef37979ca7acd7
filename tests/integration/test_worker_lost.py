"""A worker SIGKILLed in the middle of a job: the job is delivered again and succeeds."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from msam_service import redis_conn
from tests.integration.conftest import prompts
from tests.integration.harness import Service

pytestmark = pytest.mark.slow


def _running_job(service: Service, ct_nifti: Path, click: tuple) -> dict:
    with service.client() as c, open(ct_nifti, "rb") as f:
        r = c.post("/segment", files={"image": ("ct.nii.gz", f)}, data={"prompts": prompts(click)})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    body = service.wait_job(job_id, until=("running",))
    # wait until the network runs (the job is past loading: killing now loses real work)
    rec = redis_conn.client(service.redis_url)
    import time

    deadline = time.monotonic() + 30
    while rec.hget(f"msam:job:{job_id}", "stage") != b"segment" and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"job_id": job_id, **body}


def test_pool_child_sigkilled_mid_job_is_redelivered(service: Service, ct_nifti: Path) -> None:
    job = _running_job(service, ct_nifti, (21, 19, 11))
    child_pid = int(job["worker_pid"]) if "worker_pid" in job else None
    rec = redis_conn.client(service.redis_url).hget(f"msam:job:{job['job_id']}", "worker").decode()
    child_pid = int(rec.rsplit("/", 1)[1])
    os.kill(child_pid, signal.SIGKILL)  # the process running the job (an OOM kill looks like this)
    done = service.wait_job(job["job_id"], timeout=120)
    assert done["status"] == "succeeded", (done, service.logs())
    assert done["attempts"] == 2
    assert "nifti" in done["results"]


def test_whole_worker_sigkilled_mid_job_is_redelivered_to_another(service: Service, ct_nifti: Path) -> None:
    """Main process and child die together (a lost node): the message stays unacknowledged in
    Redis and is handed to the next worker after the visibility timeout."""
    job = _running_job(service, ct_nifti, (23, 21, 12))
    service.kill_worker("w1")
    service.start_worker("w2")
    try:
        done = service.wait_job(job["job_id"], timeout=150)
        assert done["status"] == "succeeded", (done, service.logs())
        assert done["attempts"] == 2
    finally:
        service.workers["w1"] = service.workers.pop("w2")  # later tests use "w1"
