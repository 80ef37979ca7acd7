"""User mistakes get a 4xx with a message that says what is wrong - never a 500."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.integration.conftest import prompts
from tests.integration.harness import Service

pytestmark = pytest.mark.slow


def _post(service: Service, files, data=None, **kw):
    with service.client() as c:
        return c.post("/segment", files=files, data=data, **kw)


def _error(r) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["code"] and body["message"]
    return body


@pytest.fixture(scope="module")
def nifti_bytes(ct_nifti: Path) -> bytes:
    return ct_nifti.read_bytes()


def test_bad_uploads(service: Service, nifti_bytes: bytes, tmp_path: Path) -> None:
    ok = {"prompts": prompts((5, 5, 5))}
    e = _error(_post(service, {"image": ("scan.nii.gz", b"not an image at all")}, ok))
    assert e["code"] == "invalid_volume" and "NIfTI" in e["message"]
    e = _error(_post(service, {"image": ("scan.nii.gz", gzip.compress(b"truncated"))}, ok))
    assert e["code"] == "invalid_volume"
    e = _error(_post(service, {"image": ("notes.txt", b"hello")}, ok))
    assert "unknown format" in e["message"]
    e = _error(_post(service, {"image": ("scan.nii.gz", b"")}, ok))
    assert "empty" in e["message"]
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(flat))
    e = _error(_post(service, {"image": ("flat.nii.gz", flat.read_bytes())}, ok))
    assert "3D" in e["message"]
    e = _error(_post(service, None, ok))  # no image
    assert "image" in e["message"]
    e = _error(_post(service, [("image", ("a.nii.gz", nifti_bytes)), ("image", ("b.nii.gz", nifti_bytes))], ok))
    assert "one NIfTI" in e["message"]


def _stored_volumes(service: Service) -> set[str]:
    root = Path(service.env["MSAM_STORAGE_DIR"]) / "volumes"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_bad_prompts(service: Service, nifti_bytes: bytes) -> None:
    img = {"image": ("ct.nii.gz", nifti_bytes)}
    before = _stored_volumes(service)
    e = _error(_post(service, img, {"prompts": "{not json"}))
    assert e["code"] == "invalid_request" and "JSON" in e["message"]
    e = _error(_post(service, img, {"prompts": prompts((500, 5, 5))}))
    assert e["code"] == "invalid_prompt" and "outside the image" in e["message"]
    e = _error(_post(service, img, {"prompts": json.dumps({"lesions": [{"negative": [[1, 2, 3]]}]})}))
    assert "positive" in e["message"]
    e = _error(_post(service, img, {"prompts": json.dumps({"space": "IJK", "lesions": [{"positive": [[1, 2, 3]]}]})}))
    assert "space" in e["message"]
    e = _error(_post(service, img, {"prompts": json.dumps({"lesions": [{"positive": [[1, 2]]}]})}))
    assert "positive" in e["message"]
    e = _error(_post(service, img, {"prompts": '{"lesions": [{"positive": [[NaN, 2, 3]]}]}'}))
    e = _error(_post(service, img, {"prompts": json.dumps({"lesions": []})}))
    assert "lesions" in e["message"]
    e = _error(_post(service, img))  # no prompts field
    assert "prompts" in e["message"]
    e = _error(_post(service, {**img, "masks": ("m.nii.gz", b"junk")}, {"prompts": prompts((5, 5, 5))}))
    assert "mask" in e["message"]
    assert _stored_volumes(service) == before  # a refused request keeps no image


def test_bad_lines_are_a_422_that_says_why(service: Service, nifti_bytes: bytes) -> None:
    img = {"image": ("ct.nii.gz", nifti_bytes)}  # shape (48, 40, 24), slices along k
    for line, expected in (([[10, 10, 5], [10, 10, 5]], "zero length"),
                           ([[10, 10, 5], [90, 10, 5]], "outside the image"),
                           ([[10, 10, 5], [20, 12, 8]], "not in one slice"),
                           ([[10, 10, 5]], "line"),
                           ([[10, 10, 5], [20, 10, "5"]], "JSON number")):
        r = _post(service, img, {"prompts": json.dumps({"space": "voxel", "lesions": [{"line": line}]})})
        assert r.status_code == 422, (line, r.text)
        assert expected in r.json()["error"]["message"], (line, r.json())
    with service.client() as c:  # the same checks for JSON requests on a stored volume
        vol = c.post("/volumes", files=img).json()["volume_id"]
        r = c.post("/segment", json={"volume_id": vol, "prompts": {"lesions": [{"line": [[1, 1, 1], [1, 1, 1]]}]}})
        assert r.status_code == 422 and "zero length" in r.json()["error"]["message"], r.text
        r = c.post("/segment", json={"volume_id": vol, "destinations": [], "send": ["sr"],
                                     "prompts": {"lesions": [{"positive": [[1, 1, 1]]}]}})
        assert r.status_code == 422 and "SEG" in r.text, r.text


def test_bad_requests(service: Service) -> None:
    with service.client() as c:
        e = _error(c.post("/segment", json={"volume_id": "0" * 32, "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}}))
        assert e["code"] == "not_found"
        e = _error(c.post("/segment", json={"volume_id": "../../etc", "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}}))
        e = _error(c.post("/segment", content=b"x=1", headers={"content-type": "text/plain"}))
        assert "multipart" in e["message"]
        e = _error(c.post("/segment", content=b"{", headers={"content-type": "application/json"}))
        e = _error(c.get("/jobs/" + "f" * 32))
        assert e["code"] == "not_found"
        e = _error(c.get("/jobs/nonsense/result"))
        e = _error(c.delete("/jobs/" + "a" * 32))
        e = _error(c.get("/jobs/" + "f" * 32 + "/result", params={"format": "jpeg"}))
        assert "format" in e["message"]
