"""The API in-process (TestClient) on a private Redis: tenants, errors, OpenAPI; no worker."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from msam_service.settings import Settings


@pytest.fixture
def nifti(tmp_path: Path) -> bytes:
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8), np.int16), np.diag([1.5, 1.5, 3.0, 1])), str(path))
    return path.read_bytes()


def _client(redis_url: str, tmp_path: Path, keys: str = "") -> TestClient:
    settings = Settings(redis_url=redis_url, storage_dir=tmp_path / "storage", api_keys=keys)
    return TestClient(create_app(settings))


def test_tenants_see_only_their_own(r, redis_url: str, tmp_path: Path, nifti: bytes) -> None:
    from msam_service.auth import hash_key

    with _client(redis_url, tmp_path, keys=f"a:{hash_key('key-a')},b:{hash_key('key-b')}") as c:
        assert c.post("/volumes", files={"image": ("ct.nii.gz", nifti)}).status_code == 401
        bad = c.post("/volumes", files={"image": ("ct.nii.gz", nifti)}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        vol = c.post("/volumes", files={"image": ("ct.nii.gz", nifti)}, headers=a)
        assert vol.status_code == 201, vol.text
        info = vol.json()
        assert info["shape"] == [12, 10, 8] and info["spacing"] == [1.5, 1.5, 3.0] and info["format"] == "nifti"
        body = {"volume_id": info["volume_id"], "prompts": {"lesions": [{"positive": [[5, 5, 4]]}]}}
        job = c.post("/segment", json=body, headers=a)
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]
        assert c.get(f"/jobs/{job_id}", headers=a).json()["status"] == "queued"
        assert c.get(f"/jobs/{job_id}", headers=a).json()["queue_position"] == 1
        # another tenant: the same ids do not exist
        assert c.get(f"/jobs/{job_id}", headers=b).status_code == 404
        assert c.delete(f"/jobs/{job_id}", headers=b).status_code == 404
        assert c.post("/segment", json=body, headers=b).status_code == 404
        # the owner cancels (nothing runs it here), then deletes it
        assert c.delete(f"/jobs/{job_id}", headers=a).json()["status"] == "canceled"
        assert c.delete(f"/jobs/{job_id}", headers=a).status_code == 204
        assert c.get("/healthz").status_code == 200  # probes need no key


def test_readyz_without_worker_and_prompt_check_before_queueing(r, redis_url: str, tmp_path: Path,
                                                                nifti: bytes) -> None:
    with _client(redis_url, tmp_path) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "no worker alive" in ready.json()["reasons"][0]
        r_ = c.post("/segment", files={"image": ("ct.nii.gz", nifti)},
                    data={"prompts": '{"space": "RAS", "lesions": [{"positive": [[500, 0, 0]]}]}'})
        assert r_.status_code == 422 and r_.json()["error"]["code"] == "invalid_prompt"
        assert r.llen("msam") == 0  # nothing was queued


def test_http_errors_keep_the_error_shape_and_oversized_uploads_are_refused_early(
        r, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, storage_dir=tmp_path / "storage", max_upload_mb=1)
    with TestClient(create_app(settings)) as c:
        missing = c.get("/no/such/route")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        wrong = c.put("/segment")
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
        big = c.post("/volumes", files={"image": ("ct.nii.gz", b"0" * (3 * 2**20))})
        assert big.status_code == 413 and "MSAM_MAX_UPLOAD_MB" in big.json()["error"]["message"]


def test_bodies_in_the_wrong_media_type_are_415s_that_say_what_to_send(r, redis_url: str, tmp_path: Path,
                                                                       nifti: bytes) -> None:
    """JSON routes sent a body without ``Content-Type: application/json`` (curl -d's default is a
    form), and /volumes sent anything but multipart: 415 naming what to send, not a 422 about a
    missing object; an empty body and a proper one pass."""
    with _client(redis_url, tmp_path) as c:
        vol = c.post("/volumes", files={"image": ("ct.nii.gz", nifti)}).json()
        body = '{"volume_id": "%s"}' % vol["volume_id"]
        for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}, {}):
            bad = c.post("/sessions", content=body, headers=headers)
            assert bad.status_code == 415, (headers, bad.text)
            assert bad.json()["error"]["code"] == "unsupported_media_type"
            assert "Content-Type: application/json" in bad.json()["error"]["message"]
        made = c.post("/sessions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
        sid = made.json()["session_id"]
        assert c.post(f"/sessions/{sid}/lesions").status_code == 201  # no body: the defaults
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for path in (f"/sessions/{sid}/lesions", f"/sessions/{sid}/lesions/1/interactions", f"/sessions/{sid}/commit"):
            assert c.post(path, content='{"label": "a"}', headers=form).status_code == 415, path
        # JSON that is wrong says what to send, not what failed inside the parser
        J, url = {"Content-Type": "application/json"}, f"/sessions/{sid}/lesions/1/interactions"
        for sent, says in (('{"xyz": [1, 2, 3]}', "the field 'kind' is missing"),
                           ('{"kind": ', "the body is not valid JSON (Expecting value at character 10)"),
                           ("", "the request needs a JSON body"),
                           ('{"kind": "point", "xyz": [1, 2, 3], "positive": "no"}', "point.positive: Input should "
                            "be a valid boolean")):
            answer = c.post(url, content=sent, headers=J)
            assert answer.status_code == 422 and says in answer.json()["error"]["message"], (sent, answer.text)
        nan = c.post(url, params={"wait": "nan"}, json={"kind": "point", "xyz": [1, 2, 3]})
        assert nan.status_code == 422 and "query.wait: Input should be a finite number" in nan.text, nan.text
        # a prompts form field that is not JSON is named as the field, not as the body
        form_bad = c.post("/segment", files={"image": ("ct.nii.gz", nifti)}, data={"prompts": '{"space": '})
        assert form_bad.status_code == 422, form_bad.text
        assert form_bad.json()["error"]["message"].startswith("prompts: the form field is not valid JSON"), form_bad.text
        raw = c.post("/volumes", content=nifti, headers={"Content-Type": "application/octet-stream"})
        assert raw.status_code == 415 and "-F image=@" in raw.json()["error"]["message"], raw.text
        assert c.post("/volumes", json={"image": "ct.nii.gz"}).status_code == 415


def test_openapi_references_resolve(redis_url: str, tmp_path: Path) -> None:
    import json
    import re

    spec = create_app(Settings(redis_url=redis_url, storage_dir=tmp_path / "s")).openapi()
    components = spec["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs <= set(components), refs - set(components)
    body = spec["paths"]["/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "prompts" in components["SegmentByVolume"]["properties"]
    # errors as the service answers them: its own body for every 422, a 401 where a key is taken
    error = {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in json.dumps(spec)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status in ("401", "422"):
                    assert response["content"]["application/json"]["schema"] == error, (path, method, status)
    for path, method in (("/volumes/{volume_id}", "get"), ("/volumes/{volume_id}", "delete"),
                         ("/jobs/{job_id}", "delete"), ("/sessions/{session_id}/lesions/{lesion}/interactions", "post"),
                         ("/sessions", "post")):
        assert {"401", "422"} <= set(spec["paths"][path][method]["responses"]), (path, method)
    assert "401" not in spec["paths"]["/healthz"]["get"]["responses"]
    assert "application/octet-stream" in spec["paths"]["/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]


def test_a_click_that_cannot_be_queued_is_withdrawn_or_said_to_be_recorded(r, redis_url: str, tmp_path: Path,
                                                                          nifti: bytes, monkeypatch) -> None:
    """A 503 for a click means it was not applied (it is taken back out of the lesion), so the
    client may send it again; when Redis does not answer for that either, the 503 names the
    interaction and says to check the session first. (Redis failing at exactly that moment is
    injected: the queue's send raises as a stalled Redis makes it.)"""
    import redis as redis_lib

    from api.routes import sessions as routes
    from msam_service import sessions as S

    def unreachable(*_a, **_k) -> None:
        raise redis_lib.ConnectionError("Timeout reading from socket")

    with _client(redis_url, tmp_path) as c:
        vol = c.post("/volumes", files={"image": ("ct.nii.gz", nifti)}).json()["volume_id"]
        sid = c.post("/sessions", json={"volume_id": vol}).json()["session_id"]
        c.post(f"/sessions/{sid}/lesions")
        click = {"kind": "point", "xyz": [5, 5, 4], "positive": True}
        monkeypatch.setattr(routes, "_send", unreachable)
        failed = c.post(f"/sessions/{sid}/lesions/1/interactions", json=click, params={"wait": 0})
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "unavailable", failed.text
        lesion = c.get(f"/sessions/{sid}").json()["lesions"][0]
        assert lesion["step"] == 0 and lesion["interactions"] == []  # not applied: sending it again is right
        change = S.SessionStore.change
        calls = []

        def change_once(self, *a, **k):  # the click's own edit lands, the withdrawal does not
            calls.append(1)
            if len(calls) > 1:
                unreachable()
            return change(self, *a, **k)

        monkeypatch.setattr(S.SessionStore, "change", change_once)
        failed = c.post(f"/sessions/{sid}/lesions/1/interactions", json=click, params={"wait": 0})
        assert failed.status_code == 503, failed.text
        message = failed.json()["error"]["message"]
        assert "may still be recorded" in message and f"GET /sessions/{sid}" in message and "undo" in message
        recorded = c.get(f"/sessions/{sid}").json()["lesions"][0]["interactions"]
        assert [a["id"] for a in recorded] == [message.split("(as ")[1].split(")")[0]]


def test_a_volume_is_read_back_and_deleted_by_its_tenant_alone(r, redis_url: str, tmp_path: Path,
                                                                nifti: bytes) -> None:
    from msam_service.auth import hash_key

    with _client(redis_url, tmp_path, keys=f"a:{hash_key('key-a')},b:{hash_key('key-b')}") as c:
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        made = c.post("/volumes", files={"image": ("ct.nii.gz", nifti)}, headers=a).json()
        vid = made["volume_id"]
        got = c.get(f"/volumes/{vid}", headers=a)
        assert got.status_code == 200 and got.json() == made  # the geometry its upload answered
        assert got.json()["affine_ras"][2][2] == 3.0
        assert c.get(f"/volumes/{vid}", headers=b).status_code == 404
        assert c.delete(f"/volumes/{vid}", headers=b).status_code == 404
        assert (tmp_path / "storage" / "volumes" / vid).exists()
        assert c.delete(f"/volumes/{vid}", headers=a).status_code == 204
        assert not (tmp_path / "storage" / "volumes" / vid).exists()
        gone = c.get(f"/volumes/{vid}", headers=a)
        assert gone.status_code == 404 and "upload it again" in gone.json()["error"]["message"]
        assert c.post("/sessions", json={"volume_id": vid}, headers=a).status_code == 404
