"""The Python client (clients/python, msam_client) against the real service: a session end to
end with typed errors, the job API, and the package installed on its own into a fresh virtual
environment without torch, its CLI driving the service."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msam_service import serve
from tests.integration.harness import Service

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python"))

from msam_client import Client, Conflict, InvalidRequest, NotFound  # noqa: E402


def _nifti_labels(data: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)


def test_client_session_and_job(service: Service, ct_nifti: Path, tmp_path: Path) -> None:
    with Client(service.api_url) as c:
        vol = c.upload(ct_nifti)
        assert vol.shape == nib.load(str(ct_nifti)).shape
        s = c.session(vol.volume_id)
        n = s.add_lesion(label="nodule")
        first = s.click(n, (22, 20, 12))
        assert first.step == 1 and first.measurements["voxel_count"] == int(s.masks[n].sum()) > 0
        one = s.masks[n].copy()
        second = s.click(n, (27, 20, 12), positive=False)
        assert second.step == 2 and second.timings["encode"] == 0
        # the client's mask is the service's: read the whole mask back into a fresh copy
        kept = s.masks[n].copy()
        s.masks[n][:] = True
        s.sync(n)
        np.testing.assert_array_equal(s.masks[n], kept)
        s.undo(n)
        np.testing.assert_array_equal(s.masks[n], one)
        # an edit: erase the slices k >= 12, re-run with the edited mask as input
        edited = s.masks[n].copy()
        edited[:, :, 12:] = False
        if edited.any() and (edited != s.masks[n]).any():
            answer = s.edit(n, edited, wait=60)
            assert answer.step == 2
        job = s.commit().wait()
        labels = _nifti_labels(c.download(job.job_id, "nifti", tmp_path / "m.nii.gz"))
        np.testing.assert_array_equal(labels == 1, s.masks[n])
        assert (tmp_path / "m.nii.gz").stat().st_size > 0
        # typed errors carry the service's code and message
        with pytest.raises(InvalidRequest) as bad:
            s.click(n, (400, 0, 0))
        assert bad.value.status == 422 and "outside the image" in bad.value.message
        with pytest.raises(NotFound):
            s.click(99, (22, 20, 12))
        s.reset(n)
        assert not s.masks[n].any()
        with pytest.raises(Conflict):
            s.undo(n)
        s.delete()
        with pytest.raises(NotFound):
            s.state()
        # the job API through the client
        job = c.submit(vol.volume_id, [{"positive": [[22, 20, 12]]}]).wait()
        np.testing.assert_array_equal(_nifti_labels(c.download(job.job_id, "nifti")) == 1, one)


def test_client_installs_alone_without_torch(service: Service, ct_nifti: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    source = tmp_path / "client-src"  # setuptools builds in the source folder: keep the checkout clean
    shutil.copytree(ROOT / "clients" / "python", source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "requirements.lock"), str(source)],
                   check=True, timeout=600)
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0
    env = {**os.environ, "MSAM_URL": service.api_url}
    cli = str(venv / "bin" / "msam-remote")
    out = subprocess.run([cli, "upload", str(ct_nifti)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    volume_id = json.loads(out.stdout)["volume_id"]
    out = subprocess.run([cli, "click", volume_id, "--positive", "22,20,12", "--negative", "27,20,12",
                          "--format", "nifti", "--out", str(tmp_path / "mask.nii.gz")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    steps = [json.loads(line) for line in out.stdout.splitlines()[:2]]
    assert [s["step"] for s in steps] == [1, 2] and steps[1]["measurements"]["voxel_count"] >= 0
    assert (_nifti_labels((tmp_path / "mask.nii.gz").read_bytes()) == 1).sum() == steps[1]["measurements"]["voxel_count"]
    out = subprocess.run([cli, "click", volume_id, "--positive", "400,0,0"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "outside the image" in out.stderr
    # nothing listening: one line that says so, no traceback
    out = subprocess.run([cli, "job", "0" * 32], env={**env, "MSAM_URL": f"http://127.0.0.1:{serve.free_port()}"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("msam-remote: cannot reach the service at"), out.stderr
    assert "Traceback" not in out.stderr
