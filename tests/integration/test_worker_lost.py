"""A worker SIGKILLed in the middle of a job: the job is delivered again and succeeds."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from msam_service import redis_conn
from tests.integration.harness import Service

pytestmark = pytest.mark.slow


def _progress_state(service: Service, job_id: str) -> tuple[str, dict]:
    """The job's Celery task state, as any Celery client sees it."""
    from msam_service.queue import make_celery
    from msam_service.settings import Settings

    app = make_celery(Settings(redis_url=service.redis_url))
    result = app.AsyncResult(job_id)
    return result.state, result.info if isinstance(result.info, dict) else {}


def _running_job(service: Service, ct_nifti: Path, click: tuple) -> dict:
    # six lesions on distinct crops: six encoder passes, a wide window to kill the job mid-way
    lesions = [{"positive": [[click[0] - 3 * n, click[1] - 2 * n, click[2]]]} for n in range(6)]
    with service.client() as c, open(ct_nifti, "rb") as f:
        r = c.post("/segment", files={"image": ("ct.nii.gz", f)}, data={"prompts": json.dumps({"lesions": lesions})})
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

    rec = redis_conn.client(service.redis_url).hget(f"msam:job:{job['job_id']}", "worker").decode()
    child_pid = int(rec.rsplit("/", 1)[1])
    os.kill(child_pid, signal.SIGKILL)  # the process running the job (an OOM kill looks like this)
    state, info = _progress_state(service, job["job_id"])  # progress is published as task state
    assert state == "PROGRESS" and info["stage"] in ("load", "segment") and 0 < info["progress"] < 1, (state, info)
    done = service.wait_job(job["job_id"], timeout=120)
    assert done["status"] == "succeeded", (done, service.logs())
    assert done["attempts"] == 2
    assert "nifti" in done["results"]


def test_whole_worker_sigkilled_mid_job_is_redelivered_to_another(service: Service, ct_nifti: Path) -> None:
    """Main process and child die together (a lost node): the message stays unacknowledged in
    Redis and is handed to the next worker after the visibility timeout - also when the node died
    holding the lock of the scan that restores such messages (it expires as configured)."""
    from msam_service.queue import celery_config
    from msam_service.settings import Settings

    job = _running_job(service, ct_nifti, (23, 21, 12))
    options = celery_config(Settings(redis_url=service.redis_url))["broker_transport_options"]
    # the lock as the dying worker would have left it (kombu's Mutex: SET NX EX, default 300 s)
    redis_conn.client(service.redis_url).set("unacked_mutex", "held-by-the-lost-worker", nx=True,
                                             ex=options.get("unacked_mutex_expire", 300))
    service.kill_worker("w1")
    service.start_worker("w2")
    try:
        done = service.wait_job(job["job_id"], timeout=150)
        assert done["status"] == "succeeded", (done, service.logs())
        assert done["attempts"] == 2
    finally:
        service.workers["w1"] = service.workers.pop("w2")  # later tests use "w1"


def test_a_job_that_keeps_killing_its_worker_fails_after_the_cap(tmp_path: Path, redis_server: str,
                                                                 checkpoint: Path, ct_nifti: Path) -> None:
    from tests.integration.conftest import service_env

    url = redis_server.replace("?db=0", "?db=5")
    svc = Service(tmp=tmp_path, redis_url=url, env=service_env(tmp_path, url, checkpoint, MSAM_QUEUE="cap",
                                                                MSAM_MAX_DELIVERIES="1"))
    try:
        svc.start_worker("cap")
        svc.start_api()
        job = _running_job(svc, ct_nifti, (20, 20, 12))
        worker = redis_conn.client(url).hget(f"msam:job:{job['job_id']}", "worker").decode()
        os.kill(int(worker.rsplit("/", 1)[1]), signal.SIGKILL)
        done = svc.wait_job(job["job_id"], timeout=60)
        assert done["status"] == "failed" and done["error"]["code"] == "worker_lost", done
        assert "stopped its worker 1 times" in done["error"]["message"]
    finally:
        svc.stop()
