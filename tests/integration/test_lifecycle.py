"""Cancel (queued and running), delete, and several clients at once."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest

from tests.integration.harness import Service

pytestmark = pytest.mark.slow


def _volume(service: Service, ct_nifti: Path) -> str:
    with service.client() as c, open(ct_nifti, "rb") as f:
        return c.post("/volumes", files={"image": ("ct.nii.gz", f)}).json()["volume_id"]


def _submit(service: Service, volume_id: str, click: list[float], lesions: int = 1) -> str:
    """A job with ``lesions`` lesions on distinct crops (each costs an encoder pass)."""
    doc = {"lesions": [{"positive": [[click[0] + 2 * n, click[1] + n, click[2]]]} for n in range(lesions)]}
    with service.client() as c:
        r = c.post("/segment", json={"volume_id": volume_id, "prompts": doc})
        assert r.status_code == 202, r.text
        return r.json()["job_id"]


def test_cancel_queued_and_running_then_delete(service: Service, ct_nifti: Path) -> None:
    vid = _volume(service, ct_nifti)
    running = _submit(service, vid, [10, 10, 5], lesions=12)  # long enough to be caught running
    queued = _submit(service, vid, [12, 30, 18])
    with service.client() as c:
        assert c.get(f"/jobs/{queued}").json()["queue_position"] >= 1
        service.wait_job(running, until=("running",))
        r = c.delete(f"/jobs/{queued}")
        assert r.status_code == 202 and r.json()["status"] == "canceled"
        r = c.delete(f"/jobs/{running}")
        assert r.status_code == 202 and r.json()["status"] == "canceled"
        time.sleep(0.5)
        # the worker stopped at its next step and never made results; the queued job never ran
        for job_id in (running, queued):
            body = service.wait_job(job_id)
            assert body["status"] == "canceled" and body["results"] == {}
            assert c.get(f"/jobs/{job_id}/result").status_code == 409
        assert c.get(f"/jobs/{queued}").json()["started_at"] is None
        # a finished job is deleted: 204, then gone
        assert c.delete(f"/jobs/{running}").status_code == 204
        assert c.get(f"/jobs/{running}").status_code == 404
    # the worker is free again: a new job runs to the end
    assert service.wait_job(_submit(service, vid, [22, 20, 12]))["status"] == "succeeded"


def test_concurrent_clients(service: Service, ct_nifti: Path) -> None:
    vid = _volume(service, ct_nifti)
    clicks = [[20, 20, 10], [26, 18, 14], [16, 24, 8]]
    with concurrent.futures.ThreadPoolExecutor(len(clicks)) as pool:
        job_ids = list(pool.map(lambda click: _submit(service, vid, click), clicks))
        results = list(pool.map(service.wait_job, job_ids))
    assert [r["status"] for r in results] == ["succeeded"] * 3, service.logs()
    assert len({r["job_id"] for r in results}) == 3
    # one worker: they ran one after the other, each waited in the queue for the previous
    starts = sorted(r["started_at"] for r in results)
    finishes = sorted(r["finished_at"] for r in results)
    assert starts[1] >= finishes[0] - 0.05 and starts[2] >= finishes[1] - 0.05
    shortest_run = min(r["finished_at"] - r["started_at"] for r in results)
    assert max(r["timings"]["queue"] for r in results) >= 0.9 * shortest_run  # someone waited its turn
