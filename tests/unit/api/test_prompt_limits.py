"""Request limits come from the settings alone: MSAM_MAX_LESIONS and MSAM_MAX_POINTS decide what
``POST /segment`` accepts (above and below the defaults) and ``GET /info`` reports the same values.
In-process (TestClient), a private Redis, no worker: jobs are only queued."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from fastapi.testclient import TestClient

from api.main import create_app
from msam_service.settings import Settings


def _nifti() -> bytes:
    img = nib.Nifti1Image(np.zeros((12, 10, 8), np.int16), np.diag([1.5, 1.5, 3.0, 1]))
    return gzip.compress(img.to_bytes())


def _segment(c: TestClient, vid: str, lesions: list[dict]) -> object:
    return c.post("/segment", json={"volume_id": vid, "prompts": {"lesions": lesions}})


def _client(redis_url: str, tmp_path: Path, **limits: int) -> TestClient:
    return TestClient(create_app(Settings(redis_url=redis_url, storage_dir=tmp_path / "storage",
                                          max_jobs_in_flight=100, **limits)))


def test_more_lesions_and_points_than_the_defaults_when_the_settings_allow(r, redis_url: str,
                                                                            tmp_path: Path) -> None:
    with _client(redis_url, tmp_path, max_lesions=40, max_points=70, max_prompts=4000) as c:
        rules = c.get("/info").json()["prompts"]
        assert (rules["max_lesions"], rules["max_points_per_lesion"], rules["max_prompts"]) == (40, 70, 4000)
        vid = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}).json()["volume_id"]
        forty = [{"positive": [[5, 5, 4]]}] * 40
        assert _segment(c, vid, forty).status_code == 202
        seventy = [{"positive": [[5, 5, 4]] * 40, "negative": [[1, 1, 1]] * 30}]
        assert _segment(c, vid, seventy).status_code == 202
        e = _segment(c, vid, forty + [{"positive": [[5, 5, 4]]}])
        assert e.status_code == 422 and e.json()["error"]["code"] == "too_many_prompts"
        assert "41 lesions" in e.json()["error"]["message"] and "MSAM_MAX_LESIONS" in e.json()["error"]["message"]
        e = _segment(c, vid, [{"positive": [[5, 5, 4]]}, {"positive": [[5, 5, 4]] * 41, "negative": [[1, 1, 1]] * 30}])
        assert e.status_code == 422 and e.json()["error"]["code"] == "too_many_prompts"
        message = e.json()["error"]["message"]
        assert "lesion 2 has 71 clicks" in message and "MSAM_MAX_POINTS" in message


def test_fewer_lesions_and_points_when_the_settings_say_so(r, redis_url: str, tmp_path: Path) -> None:
    with _client(redis_url, tmp_path, max_lesions=2, max_points=3) as c:
        rules = c.get("/info").json()["prompts"]
        assert (rules["max_lesions"], rules["max_points_per_lesion"]) == (2, 3)
        vid = c.post("/volumes", files={"image": ("ct.nii.gz", _nifti())}).json()["volume_id"]
        assert _segment(c, vid, [{"positive": [[5, 5, 4]] * 2, "negative": [[1, 1, 1]]}] * 2).status_code == 202
        e = _segment(c, vid, [{"positive": [[5, 5, 4]]}] * 3)
        assert e.status_code == 422 and "MSAM_MAX_LESIONS" in e.json()["error"]["message"]
        e = _segment(c, vid, [{"positive": [[5, 5, 4]] * 2, "negative": [[1, 1, 1]] * 2}])
        assert e.status_code == 422 and "MSAM_MAX_POINTS" in e.json()["error"]["message"]
        # the multipart form is held to the same settings
        e = c.post("/segment", files={"image": ("ct.nii.gz", _nifti())},
                   data={"prompts": '{"lesions": [{"positive": [[5, 5, 4]]}, {"positive": [[5, 5, 4]]}, '
                                    '{"positive": [[5, 5, 4]]}]}'})
        assert e.status_code == 422 and "MSAM_MAX_LESIONS" in e.json()["error"]["message"]


def test_the_openapi_schema_holds_no_fixed_count() -> None:
    """The counts are the deployment's (GET /info), so the published schema must not fix them."""
    from api.schemas import Prompts
    schema = Prompts.model_json_schema()
    assert "maxItems" not in schema["properties"]["lesions"]
    lesion = schema["$defs"]["Lesion"]["properties"]
    assert "maxItems" not in lesion["positive"] and "maxItems" not in lesion["negative"]
