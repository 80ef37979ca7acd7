"""A second click on a known volume reuses the embedding in Redis: the encoder does not run."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import Service

pytestmark = pytest.mark.slow


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_second_click_hits_the_embedding_cache(service: Service, ct_nifti: Path) -> None:
    with service.client() as c:
        with open(ct_nifti, "rb") as f:
            vol = c.post("/volumes", files={"image": ("ct.nii.gz", f)}).json()
        before = c.get("/metrics").text
        first_click = {"positive": [[30, 14, 10]]}
        r1 = c.post("/segment", json={"volume_id": vol["volume_id"], "prompts": {"lesions": [first_click]}})
        cold = service.wait_job(r1.json()["job_id"])
        # follow-up: same first positive (so the same crop), one more negative and positive
        follow = {"positive": [[30, 14, 10], [28, 15, 10]], "negative": [[40, 30, 20]]}
        r2 = c.post("/segment", json={"volume_id": vol["volume_id"], "prompts": {"lesions": [follow]}})
        warm = service.wait_job(r2.json()["job_id"])
        after = c.get("/metrics").text

    assert cold["status"] == warm["status"] == "succeeded", service.logs()
    assert cold["encoder_runs"] == 1 and cold["cache_hits"] == 0
    assert warm["encoder_runs"] == 0 and warm["cache_hits"] == 1  # the encoder did not run
    assert warm["timings"]["encode"] == 0.0
    assert warm["timings"]["model_load"] is None  # the model is loaded once per worker process
    assert cold["timings"]["encode"] > 0.05
    hits = _metric(after, "msam_embedding_cache_total", '{result="hit"}') - _metric(before, "msam_embedding_cache_total", '{result="hit"}')
    misses = _metric(after, "msam_embedding_cache_total", '{result="miss"}') - _metric(before, "msam_embedding_cache_total", '{result="miss"}')
    assert hits == 1 and misses == 1
    assert _metric(after, "msam_embedding_cache_bytes") > 0
    assert _metric(after, "msam_stage_seconds_count", '{stage="encode"}') >= 2


def test_metrics_and_openapi(service: Service) -> None:
    with httpx.Client(base_url=service.api_url) as c:
        text = c.get("/metrics").text
        for name in ("msam_jobs_finished_total", "msam_queue_depth", "msam_jobs{", "msam_stage_seconds_bucket",
                     "msam_embedding_cache_total", "msam_http_requests_total"):
            assert name in text, name
        spec = c.get("/openapi.json").json()
        assert {"/segment", "/volumes", "/jobs/{job_id}", "/jobs/{job_id}/result", "/healthz", "/readyz",
                "/metrics"} <= set(spec["paths"])
        assert set(spec["paths"]["/segment"]["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] >= 1
