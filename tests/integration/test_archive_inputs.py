"""Inputs as archives hold them, through the real service: a MetaImage pair (two files, or a zip)
segmented like the NIfTI of the same image and answered as MetaImage on the input's grid, a 5-D
NIfTI with singleton dimensions, what the job says about the intensities, and lesion masks as
prompts (uploaded with the request or as a volume)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msam_core.io.load import load_volume
from tests.integration.conftest import prompts
from tests.integration.harness import Service
from tests.unit.io.test_metaimage_5d import write_metaimage

pytestmark = pytest.mark.slow


def _segment(service: Service, files: list, prompt_doc: str) -> dict:
    with service.client() as c:
        r = c.post("/segment", files=files, data={"prompts": prompt_doc})
    assert r.status_code == 202, r.text
    job = service.wait_job(r.json()["job_id"])
    assert job["status"] == "succeeded", (job, service.logs())
    return job


def _result(service: Service, job: dict, fmt: str, path: Path) -> Path:
    with service.client() as c:
        r = c.get(f"/jobs/{job['job_id']}/result", params={"format": fmt})
    assert r.status_code == 200, r.text
    path.write_bytes(r.content)
    return path


def test_metaimage_pair_segments_like_nifti_and_answers_as_metaimage(service: Service, ct_nifti: Path,
                                                                    tmp_path: Path) -> None:
    src = nib.load(str(ct_nifti))
    write_metaimage(np.asarray(src.dataobj), src.affine, tmp_path / "case.mhd", compress=True)
    click = prompts((22, 20, 12))
    reference = _segment(service, [("image", ("ct.nii.gz", ct_nifti.read_bytes()))], click)
    assert reference["intensity"] == {"hu": False, "reason": reference["intensity"]["reason"]}
    assert "no modality" in reference["intensity"]["reason"]
    with service.client() as c:  # a NIfTI job has no MetaImage result, and says why
        r = c.get(f"/jobs/{reference['job_id']}/result", params={"format": "mha"})
    assert r.status_code == 422 and "MetaImage input" in r.json()["error"]["message"]

    job = _segment(service, [("image", ("case.mhd", (tmp_path / "case.mhd").read_bytes())),
                             ("image", ("case.zraw", (tmp_path / "case.zraw").read_bytes()))], click)
    assert "mha" in job["results"] and "nifti" in job["results"]
    mask = load_volume(_result(service, job, "mha", tmp_path / "mask.mha"))
    expected = np.asarray(nib.load(str(_result(service, reference, "nifti", tmp_path / "ref.nii.gz"))).dataobj)
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-5)  # the input's grid
    np.testing.assert_array_equal(mask.array, expected)  # the same voxels as the NIfTI upload's mask
    assert expected.any()

    # the same pair zipped (in a folder, as archives hold them) is one MetaImage volume
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(tmp_path / "case.mhd", "luna/case.mhd")
        z.write(tmp_path / "case.zraw", "luna/case.zraw")
    with service.client() as c:
        r = c.post("/volumes", files={"image": ("case.zip", buf.getvalue())})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "metaimage" and r.json()["shape"] == list(src.shape)
    np.testing.assert_allclose(r.json()["affine_ras"], src.affine, atol=1e-5)


def test_five_d_nifti_upload_is_the_3d_image(service: Service, ct_nifti: Path, tmp_path: Path) -> None:
    src = nib.load(str(ct_nifti))
    five = nib.Nifti1Image(np.asarray(src.dataobj).reshape(*src.shape, 1, 1), src.affine)
    nib.save(five, str(tmp_path / "image3D.nii.gz"))
    with service.client() as c:
        r = c.post("/volumes", files={"image": ("image3D.nii.gz", (tmp_path / "image3D.nii.gz").read_bytes())})
    assert r.status_code == 201, r.text
    assert r.json()["shape"] == list(src.shape)


def test_mask_prompts_uploaded_with_the_request_and_as_a_volume(service: Service, ct_nifti: Path,
                                                                tmp_path: Path) -> None:
    src = nib.load(str(ct_nifti))
    labels = np.zeros(src.shape, np.uint8)
    labels[19:26, 17:24, 10:15] = 2  # a coarse box around the bright blob at (22, 20, 12)
    mask_bytes = nib.Nifti1Image(labels, src.affine).to_bytes()
    image = ("image", ("ct.nii.gz", ct_nifti.read_bytes()))
    doc = {"lesions": [{"mask": {"upload": "coarse.nii", "label": 2}},
                       {"positive": [[22, 20, 12]], "mask": {"upload": "coarse.nii"}}]}
    volumes = Path(service.env["MSAM_STORAGE_DIR"]) / "volumes"
    before = set(volumes.iterdir()) if volumes.exists() else set()
    job = _segment(service, [image, ("masks", ("coarse.nii", mask_bytes))], json.dumps(doc))
    assert [x["voxels"] > 0 for x in job["lesions"]] == [True, True]
    assert len(set(volumes.iterdir()) - before) == 2  # the image and its mask, both the job's own
    with service.client() as c:
        assert c.delete(f"/jobs/{job['job_id']}").status_code == 204
    assert set(volumes.iterdir()) <= before  # deleting the job deletes both

    with service.client() as c:
        image_id = c.post("/volumes", files={"image": ("ct.nii.gz", ct_nifti.read_bytes())}).json()["volume_id"]
        mask_id = c.post("/volumes", files={"image": ("coarse.nii", mask_bytes)}).json()["volume_id"]
        r = c.post("/segment", json={"volume_id": image_id,
                                     "prompts": {"lesions": [{"mask": {"volume_id": mask_id}}]}})
        assert r.status_code == 202, r.text
        job = service.wait_job(r.json()["job_id"])
        assert job["status"] == "succeeded" and job["lesions"][0]["voxels"] > 0, job
        # a JSON request cannot name a multipart file, and a mask of another grid is a 422 saying what differs
        r = c.post("/segment", json={"volume_id": image_id,
                                     "prompts": {"lesions": [{"mask": {"upload": "coarse.nii"}}]}})
        assert r.status_code == 422 and "POST /volumes" in r.json()["error"]["message"]
        shifted = src.affine.copy()
        shifted[:3, 3] += 3.0
        other_id = c.post("/volumes", files={"image": ("o.nii", nib.Nifti1Image(labels, shifted).to_bytes())}
                          ).json()["volume_id"]
        r = c.post("/segment", json={"volume_id": image_id,
                                     "prompts": {"lesions": [{"mask": {"volume_id": other_id}}]}})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_prompt" and "first voxel lies at" in r.json()["error"]["message"]
