"""No model: the worker stays up, /readyz says why, jobs fail with that message. And `msam serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from msam_service import serve
from tests.integration.conftest import prompts, service_env
from tests.integration.harness import Service

pytestmark = pytest.mark.slow


def test_missing_checkpoint_fails_jobs_and_readyz_says_why(tmp_path: Path, redis_server: str, ct_nifti: Path) -> None:
    url = redis_server.replace("?db=0", "?db=3")  # a separate database: its own queue and workers
    env = service_env(tmp_path, url, tmp_path / "missing.safetensors", MSAM_QUEUE="nomodel")
    svc = Service(tmp=tmp_path, redis_url=url, env=env)
    try:
        worker = svc.start_worker("nomodel")
        svc.start_api()
        with svc.client() as c:
            r = c.get("/readyz")
            assert r.status_code == 503
            assert any("MSAM_CHECKPOINT" in reason for reason in r.json()["reasons"]), r.json()
            with open(ct_nifti, "rb") as f:
                job_id = c.post("/segment", files={"image": ("ct.nii.gz", f)},
                                data={"prompts": prompts((22, 20, 12))}).json()["job_id"]
        job = svc.wait_job(job_id)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "invalid_checkpoint" and "MSAM_CHECKPOINT" in job["error"]["message"]
        assert worker.poll() is None  # no crash loop
    finally:
        svc.stop()


def _children(pid: int) -> list[str]:
    """PIDs whose parent is ``pid`` (from /proc; no procps needed)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            out.append(stat.parent.name)
    return out


def test_msam_serve_embedded_redis_and_stop_together(tmp_path: Path, checkpoint: Path) -> None:
    port = serve.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_") and k != "REDIS_URL"}
    env.update(MSAM_PORT=str(port), MSAM_STORAGE_DIR=str(tmp_path / "storage"), MSAM_CHECKPOINT=str(checkpoint))
    msam = Path(sys.executable).with_name("msam")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(msam), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        serve.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200, 90,
                         "msam serve", proc)
        children = _children(proc.pid)
        assert len(children) == 4  # redis-server, worker, I/O worker, api
        text = (tmp_path / "serve.log").read_text()
        assert "embedded Redis on unix://" in text
        assert "no API keys (MSAM_API_KEYS): listening on loopback only (127.0.0.1)" in text
        os.killpg(proc.pid, signal.SIGTERM)  # SIGTERM to the process group
        assert proc.wait(30) == 0
        time.sleep(0.5)
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_time_limits_fail_the_job_with_a_message(tmp_path: Path, redis_server: str, checkpoint: Path,
                                                 ct_nifti: Path) -> None:
    url = redis_server.replace("?db=0", "?db=4")
    env = service_env(tmp_path, url, checkpoint, MSAM_QUEUE="limits", MSAM_JOB_SOFT_TIME_LIMIT_S="1",
                      MSAM_JOB_TIME_LIMIT_S="3", MSAM_VISIBILITY_TIMEOUT_S="10",
                      MSAM_MAX_WINDOWS="8")
    svc = Service(tmp=tmp_path, redis_url=url, env=env)
    try:
        worker = svc.start_worker("limits")
        svc.start_api()
        # 16 lesions on distinct crops: 16 encoder passes, well over the 1 s soft limit
        lesions = [{"positive": [[4 + 2.5 * n, 6 + 2 * n, 3 + n]]} for n in range(16)]
        with svc.client() as c, open(ct_nifti, "rb") as f:
            job_id = c.post("/segment", files={"image": ("ct.nii.gz", f)},
                            data={"prompts": json.dumps({"lesions": lesions})}).json()["job_id"]
        job = svc.wait_job(job_id, timeout=60)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "timeout" and "longer than" in job["error"]["message"]
        assert job["results"] == {}
        assert worker.poll() is None
    finally:
        svc.stop()
