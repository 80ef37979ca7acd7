"""Security and limits in-process (TestClient, private Redis, no worker): hashed per-tenant keys, loopback
rule, limits (prompts, jobs in flight, voxels, decompressed size, request deadline), DELETE,
the expiry sweep and the audit line."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.main import create_app
from msam_service import lifecycle, serve
from msam_service.auth import hash_key, load_keys, tenant_for
from msam_service.jobs import JobStore
from msam_service.settings import Settings
from msam_service.storage import LocalStorage

KEYS = f"alpha:{hash_key('key-a')},beta:{hash_key('key-b')}"
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def _nifti(shape: tuple[int, ...] = (12, 10, 8)) -> bytes:
    buf = io.BytesIO()
    img = nib.Nifti1Image(np.zeros(shape, np.int16), np.diag([1.5, 1.5, 3.0, 1]))
    buf.write(gzip.compress(img.to_bytes()))
    return buf.getvalue()


def _settings(redis_url: str, tmp_path: Path, **kw: object) -> Settings:
    return Settings(redis_url=redis_url, storage_dir=tmp_path / "storage", **kw)


def _job(c: TestClient, vid: str, headers: dict[str, str], n: int = 1) -> object:
    return c.post("/segment", headers=headers,
                  json={"volume_id": vid, "prompts": {"lesions": [{"positive": [[5, 5, 4]] * n}]}})


def test_keys_are_hashed_and_checked() -> None:
    keys = load_keys([f"alpha:{hash_key('s3cret')}"])
    assert "s3cret" not in json.dumps(keys)
    assert tenant_for("s3cret", keys) == "alpha" and tenant_for("other", keys) is None
    for bad in ("alpha:s3cret", "s3cret", f"al pha:{hash_key('x')}"):
        with pytest.raises(ValueError) as e:
            load_keys([bad])
        assert "s3cret" not in str(e.value)  # a pasted plain key never reaches a message


def test_hash_key_cli_and_keys_file(tmp_path: Path, redis_url: str, r) -> None:
    msam = Path(sys.executable).with_name("msam")
    out = subprocess.run([str(msam), "hash-key", "gamma", "--stdin"], input="key-g\n", capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"gamma:{hash_key('key-g')}"
    made = subprocess.run([str(msam), "hash-key", "delta"], capture_output=True, text=True, check=True)
    key = made.stderr.strip().rsplit(" ", 1)[1]
    assert made.stdout.strip() == f"delta:{hash_key(key)}"
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# tenants\n{out.stdout}{made.stdout}")
    with TestClient(create_app(_settings(redis_url, tmp_path, api_keys_file=keys_file))) as c:
        vid = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())},
                     headers={"Authorization": f"Bearer {key}"})
        assert vid.status_code == 201
        r_ = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}, headers={"Authorization": "Bearer key-g"})
        assert r_.status_code == 201
        r_ = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}, headers={"Authorization": "Basic a2V5"})
        assert r_.status_code == 401 and r_.headers["www-authenticate"] == "Bearer"


def test_no_keys_means_loopback_only(tmp_path: Path, redis_url: str) -> None:
    with pytest.raises(ValueError, match="without API keys"):
        create_app(_settings(redis_url, tmp_path, host="0.0.0.0"))
    with pytest.raises(ValueError, match="tenant:sha256hex"):
        create_app(_settings(redis_url, tmp_path, host="127.0.0.1", api_keys="alpha:plain-key"))
    create_app(_settings(redis_url, tmp_path, host="0.0.0.0", api_keys=KEYS))  # keys: any address
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_")}
    msam = Path(sys.executable).with_name("msam")
    refused = subprocess.run([str(msam), "serve"], env={**env, "MSAM_HOST": "0.0.0.0"}, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "without API keys" in refused.stderr
    # bound to a non-loopback address by hand (uvicorn --host): non-loopback clients get 403
    app = create_app(_settings(redis_url, tmp_path))
    with TestClient(app, client=("10.1.2.3", 5000)) as c:
        r_ = c.get("/jobs/" + "a" * 32)
        assert r_.status_code == 403 and "loopback" in r_.json()["error"]["message"]
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        assert c.get("/jobs/" + "a" * 32).status_code == 404


def test_limits(r, redis_url: str, tmp_path: Path) -> None:
    settings = _settings(redis_url, tmp_path, api_keys=KEYS, max_jobs_in_flight=2, max_prompts=3,
                         max_voxels=5000, max_decompressed_mb=1, max_files=3)
    with TestClient(create_app(settings)) as c:
        big = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti((20, 20, 20)))}, headers=A)
        assert big.status_code == 422 and "MSAM_MAX_VOXELS" in big.json()["error"]["message"]
        files = [("image", (f"{n}.dcm", b"DICM" * 40)) for n in range(4)]
        many = c.post("/volumes", files=files, headers=A)
        assert many.status_code == 413 and "MSAM_MAX_FILES" in many.json()["error"]["message"]
        vid = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}, headers=A).json()["volume_id"]
        e = _job(c, vid, A, n=4)
        assert e.status_code == 422 and "MSAM_MAX_PROMPTS" in e.json()["error"]["message"]
        assert [_job(c, vid, A).status_code for _ in range(2)] == [202, 202]
        third = _job(c, vid, A)
        assert third.status_code == 429 and int(third.headers["retry-after"]) > 0
        assert "MSAM_MAX_JOBS_IN_FLIGHT" in third.json()["error"]["message"]
        vid_b = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}, headers=B).json()["volume_id"]
        assert _job(c, vid_b, B).status_code == 202  # per tenant
        first = r.smembers("msam:inflight:alpha").pop().decode()
        assert c.delete(f"/jobs/{first}", headers=A).json()["status"] == "canceled"  # a slot frees
        assert _job(c, vid, A).status_code == 202
        # a zip that expands beyond MSAM_MAX_DECOMPRESSED_MB (a bomb: 2 MB of zeros, a few KB zipped)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("a.dcm", b"\0" * (2 << 20))
        bomb = c.post("/volumes", files={"image": ("s.zip", buf.getvalue())}, headers=A)
        assert bomb.status_code == 422 and "zip" in bomb.json()["error"]["message"]


def test_request_deadline_answers_408_to_a_stalled_upload(tmp_path: Path, redis_url: str) -> None:
    port = serve.free_port()
    app = create_app(_settings(redis_url, tmp_path, request_timeout_s=1.5))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    serve.wait_until(lambda: server.started, 20, "uvicorn")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /volumes HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")  # then nothing more
            t0 = time.monotonic()
            answer = b""
            while b"}}" not in answer and (chunk := s.recv(4096)):
                answer += chunk
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "MSAM_REQUEST_TIMEOUT_S" in answer
        assert time.monotonic() - t0 < 10
    finally:
        server.should_exit = True
        thread.join(10)


def test_delete_removes_every_file_and_the_sweep_expires(r, redis_url: str, tmp_path: Path) -> None:
    settings = _settings(redis_url, tmp_path)
    storage_dir = tmp_path / "storage"
    with TestClient(create_app(settings)) as c:
        job = c.post("/segment", files={"image": ("ct.nii.gz", _nifti())},
                     data={"prompts": json.dumps({"lesions": [{"positive": [[5, 5, 4]]}]})}).json()
        (storage_dir / "jobs" / job["job_id"]).mkdir()
        (storage_dir / "jobs" / job["job_id"] / "mask.nii.gz").write_bytes(b"x")  # as a worker would
        assert (storage_dir / "volumes" / job["volume_id"]).is_dir()
        c.delete(f"/jobs/{job['job_id']}")  # cancel, then delete
        assert c.delete(f"/jobs/{job['job_id']}").status_code == 204
        assert not any((storage_dir / "jobs").iterdir()) and not any((storage_dir / "volumes").iterdir())
        assert r.get(f"msam:volume:{job['volume_id']}") is None and not r.exists(f"msam:job:{job['job_id']}")

        kept = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}).json()["volume_id"]
        old = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}).json()["volume_id"]
        orphan = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}).json()["volume_id"]
    long_ago = time.time() - 7200
    os.utime(storage_dir / "volumes" / old, (long_ago, long_ago))
    r.delete(f"msam:volume:{orphan}")  # its owner record expired
    (storage_dir / "jobs" / ("e" * 32)).mkdir()  # results of a job whose record expired
    store = JobStore(r, 3600)
    removed = lifecycle.sweep(LocalStorage(storage_dir), store, r, ttl_s=3600, grace_s=0)
    assert removed == 3
    assert sorted(p.name for p in (storage_dir / "volumes").iterdir()) == [kept]
    assert not any((storage_dir / "jobs").iterdir())
    r.set("msam:job:short", "x", ex=1)
    time.sleep(1.2)
    assert not r.exists("msam:job:short")  # records expire by their Redis TTL (MSAM_JOB_TTL_S)


def test_one_audit_line_per_request_without_patient_data(redis_url: str, tmp_path: Path) -> None:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: lines.append(rec.getMessage())  # type: ignore[method-assign]
    audit = logging.getLogger("msam.audit")
    audit.addHandler(handler)
    try:
        with TestClient(create_app(_settings(redis_url, tmp_path, api_keys=KEYS))) as c:
            vol = c.post("/volumes", files={"image": ("Doe^Jane_12345.nii.gz", _nifti())}, headers=A).json()
            job = _job(c, vol["volume_id"], A).json()["job_id"]
            c.get(f"/jobs/{job}", headers=B)
            c.get(f"/jobs/{job}?format=Doe^Jane", headers=A)
            c.get(f"/jobs/{job}")
            c.get("/healthz")
    finally:
        audit.removeHandler(handler)
    assert len(lines) == 5, lines
    assert 'tenant=alpha action="POST /volumes"' in lines[0] and "outcome=201" in lines[0]
    assert f"volume={vol['volume_id']}" in lines[0]
    assert f"job={job}" in lines[1] and f"volume={vol['volume_id']}" in lines[1] and "outcome=202" in lines[1]
    assert "tenant=beta" in lines[2] and "outcome=404" in lines[2]
    assert "tenant=- " in lines[4] and "outcome=401" in lines[4]
    text = "\n".join(lines)
    assert "Doe" not in text and "12345" not in text and "key-a" not in text


def test_the_gateway_sweeps_expired_uploads_by_itself(r, redis_url: str, tmp_path: Path) -> None:
    settings = _settings(redis_url, tmp_path, job_ttl_s=1, sweep_interval_s=0.2)
    with TestClient(create_app(settings)) as c:
        vid = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}).json()["volume_id"]
        folder = tmp_path / "storage" / "volumes" / vid
        assert folder.is_dir()
        serve.wait_until(lambda: not folder.exists(), 10, "the sweep")
        gone = _job(c, vid, {})
        assert gone.status_code == 404 and "expired" in gone.json()["error"]["message"]


def test_sessions_belong_to_their_tenant(redis_url: str, tmp_path: Path) -> None:
    """Another tenant's session (or volume) is a 404 on every session route, as a job is."""
    with TestClient(create_app(_settings(redis_url, tmp_path, api_keys=KEYS))) as c:
        vid = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}, headers=A).json()["volume_id"]
        assert c.post("/sessions", json={"volume_id": vid}, headers=B).status_code == 404
        sid = c.post("/sessions", json={"volume_id": vid}, headers=A).json()["session_id"]
        assert c.post(f"/sessions/{sid}/lesions", headers=A).status_code == 201
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", params={"wait": 0}, headers=A,
                   json={"kind": "point", "xyz": [5, 5, 4]})
        assert r.status_code == 202, r.text  # no worker here: queued, with its link
        iid = r.json()["interaction_id"]
        for method, path, body in (("GET", f"/sessions/{sid}", None), ("DELETE", f"/sessions/{sid}", None),
                                   ("POST", f"/sessions/{sid}/lesions", {}),
                                   ("POST", f"/sessions/{sid}/lesions/1/interactions", {"kind": "point", "xyz": [5, 5, 4]}),
                                   ("GET", f"/sessions/{sid}/interactions/{iid}", None),
                                   ("POST", f"/sessions/{sid}/lesions/1/undo", None),
                                   ("GET", f"/sessions/{sid}/lesions/1/mask", None),
                                   ("POST", f"/sessions/{sid}/commit", {})):
            r = c.request(method, path, headers=B, json=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path, r.text)
        assert c.get(f"/sessions/{sid}", headers=A).json()["lesions"][0]["step"] == 1
