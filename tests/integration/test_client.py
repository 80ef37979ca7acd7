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

from msam_service import redis_conn, serve
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


def test_client_keeps_the_services_mask_and_checks_what_it_sends(service: Service, ct_nifti: Path,
                                                                    tmp_path: Path) -> None:
    """An answer whose delta applies to a mask the client does not hold (a click sent by another
    thread or program in between) makes the client read the whole mask instead; arguments the
    service could not read are refused here, with what was wrong."""
    import httpx

    with Client(service.api_url) as c:
        vol = c.upload(ct_nifti)
        s = c.session(vol.volume_id)
        n = s.add_lesion()
        s.click(n, (22, 20, 12))
        # a click the client does not see: its answer's mask is not the one the next delta applies to
        other = httpx.post(f"{service.api_url}/sessions/{s.session_id}/lesions/{n}/interactions",
                           json={"kind": "point", "xyz": [27, 20, 12], "positive": False}, timeout=60)
        assert other.status_code == 200, other.text
        third = s.click(n, (21, 20, 11))
        assert third.step == 3 and third.base is None  # read whole, not applied as a delta
        whole = np.zeros(vol.shape, bool)
        from msam_service.sessions import decode_box
        d = httpx.get(f"{service.api_url}/sessions/{s.session_id}/lesions/{n}/mask", timeout=60).json()
        assert d["interaction_id"] == third.interaction_id and d["step"] == 3
        lo, hi = d["delta"]["lo"], d["delta"]["hi"]
        whole[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = decode_box(d["delta"]["data"], tuple(h - l for l, h in zip(lo, hi)))
        np.testing.assert_array_equal(s.masks[n], whole)
        undone = s.undo(n)  # an undo's answer names the mask now in effect: the next delta applies to it
        assert undone.interaction_id == other.json()["interaction_id"]
        assert s.click(n, (21, 20, 11)).base == other.json()["interaction_id"]

        with pytest.raises(InvalidRequest, match="label"):
            s.add_lesion(label="")  # sent as given: the service says what a label must be
        for bad in ((float("nan"), 1, 2), (1, 2), ("a", 1, 2)):
            with pytest.raises(ValueError, match="xyz must be three finite numbers"):
                s.click(n, bad)
        with pytest.raises(ValueError, match="the edited mask has shape"):
            s.edit(n, np.zeros((3, 3, 3), bool))
        folder = tmp_path / "series"
        folder.mkdir()
        shutil.copy(ct_nifti, folder / ct_nifti.name)
        (folder / ".DS_Store").write_bytes(b"hidden")
        assert c.upload(folder).shape == vol.shape  # a folder: the files in it
        s.delete()


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
    # arguments that cannot work are refused before anything is sent; click leaves no session behind
    r = redis_conn.client(service.redis_url)
    sessions_before = set(r.scan_iter(match="msam:session:*"))
    out = subprocess.run([cli, "click", volume_id, "--positive", "22,20,12", "--out", str(tmp_path / "no" / "m.nii.gz")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "its folder does not exist" in out.stderr, out.stderr
    out = subprocess.run([cli, "click", volume_id, "--positive", "22,20,12", "--format", "nifty"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice: 'nifty'" in out.stderr, out.stderr
    out = subprocess.run([cli, "click", volume_id, "--positive", "22,20,12"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert set(r.scan_iter(match="msam:session:*")) <= sessions_before, "msam-remote click left its session"
    # nothing listening: one line that says so, no traceback
    out = subprocess.run([cli, "job", "0" * 32], env={**env, "MSAM_URL": f"http://127.0.0.1:{serve.free_port()}"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("msam-remote: cannot reach the service at"), out.stderr
    assert "Traceback" not in out.stderr
