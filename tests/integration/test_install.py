"""Installable as deployed: the runtime dependencies of pyproject.toml are complete.

``make install`` installs ``.[test]``, whose extras (httpx among them) can hide a runtime
dependency missing from ``[project] dependencies``. These tests build fresh virtual environments
(no ``--system-site-packages``; pip may use its cache) and run the service from them:

* ``pip install -c requirements.lock .`` (no extras): pip resolves ``[project] dependencies`` itself,
  held to the locked versions (torch's CPU build), and ``msam serve`` with the bundled model runs
  one job to success - without what only training needs (the train extra: MONAI);
* the API image's dependency set (``deploy/docker/api.Dockerfile``: the lock file it installs,
  requirements-api.lock, then ``pip install --no-deps .``): no torch, ``api.main`` answers
  ``/healthz`` and ``msam hash-key`` works. The lock's name is read from the Dockerfile itself, so
  the two cannot drift.

The source is copied first (without .git, .venv, build outputs, caches), because setuptools builds
in the source folder: a ``build/`` left in the checkout would be reused and could ship stale modules.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from msam_service import serve
from tests.integration.conftest import prompts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
API_DOCKERFILE = ROOT / "deploy" / "docker" / "api.Dockerfile"
PIP_TIMEOUT_S = 600
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "out", ".cache", "*.egg-info",
                                     "__pycache__", "*.pyc", ".pytest_cache", "node_modules")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _clean_env() -> dict[str, str]:
    """The environment without this test run's virtual environment or service settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MSAM_") and k not in ("REDIS_URL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], log: Path, cwd: Path | None = None, timeout: float = PIP_TIMEOUT_S,
         input: str | None = None) -> float:
    """Run ``cmd`` with its output appended to ``log``; fail with the log's tail. Returns seconds."""
    start = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, input=input.encode() if input is not None else None)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd[:3]} took more than {timeout} s\n{_tail(log)}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{_tail(log)}"
    return time.monotonic() - start


def _source_copy(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    return src


def _new_venv(path: Path, log: Path) -> Path:
    # the interpreter the project's .venv was made from, not the .venv itself
    python = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
    _run([python, "-m", "venv", str(path)], log, timeout=120)
    return path / "bin"


def _pip_install(bin_dir: Path, args: list[str], log: Path, cwd: Path) -> float:
    # --no-compile: no .pyc for the thousands of files of torch & co (Python compiles what it imports)
    return _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-compile", *args], log, cwd=cwd)


def _api_image_requirements(src: Path) -> Path:
    """The lock file the API image installs (``pip install ... -r <lock>``), in the source copy; the
    image then installs the project without its dependencies."""
    text = API_DOCKERFILE.read_text()
    m = re.search(r"pip install [^\n]*-r (\S+)", text)
    assert m, f"{API_DOCKERFILE}: no `pip install -r <lock>`"
    assert re.search(rf"^COPY [^\n]*\b{re.escape(m.group(1))}\b", text, re.M), f"the image does not copy {m.group(1)}"
    # the project without its dependencies (installed as is, or as a wheel built from it)
    assert re.search(r"pip (install|wheel) [^\n]*--no-deps [^\n]*\.$", text, re.M), "the image no longer installs `--no-deps .`"
    return src / m.group(1)


def _stop_group(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    """SIGTERM the process group, wait, then SIGKILL it. Returns the exit code after SIGTERM, or None."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return None
    except ProcessLookupError:
        return proc.wait(10)


def _phantom(path: Path) -> Path:
    """A small CT (LAS, anisotropic) with a bright blob around voxel (22, 20, 12): conftest's ct_nifti."""
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 60, (48, 40, 24)).astype(np.float32) - 200
    ii, jj, kk = np.indices(arr.shape)
    arr[((ii - 22) ** 2 + (jj - 20) ** 2 + ((kk - 12) * 2) ** 2) < 64] += 500
    affine = np.array([[-1.2, 0, 0, 40.0], [0, 1.1, 0, -25.0], [0, 0, 2.5, 12.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture
def workdir(tmp_path: Path):
    """pytest's tmp_path, less the venv (over 1 GB with torch) and the source copy afterwards: the logs stay."""
    yield tmp_path
    for name in ("venv", "src"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


def test_plain_pip_install_serves_a_job(workdir: Path) -> None:
    t0 = time.monotonic()
    log = workdir / "pip.log"
    src = _source_copy(workdir)
    bin_dir = _new_venv(workdir / "venv", log)
    # no extras, no -e: pip resolves the declared ranges, the lock holds them to the tested versions
    seconds = _pip_install(bin_dir, ["-c", "requirements.lock", "."], log, cwd=src)
    print(f"\nfresh venv + pip install -c requirements.lock .: {time.monotonic() - t0:.0f} s (pip {seconds:.0f} s)")
    missing = subprocess.run([str(bin_dir / "python"), "-c", "import importlib.util as u; print(u.find_spec('monai'))"],
                             env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert missing.stdout.strip() == "None", f"the train extra's MONAI came with the runtime set\n{missing.stderr}"

    port = serve.free_port()
    env = _clean_env()
    env.update(MSAM_PORT=str(port), MSAM_STORAGE_DIR=str(workdir / "storage"), MSAM_TORCH_THREADS="1",
               MSAM_CHECKPOINT="",  # the bundled model, installed as package data
               MSAM_MAX_WINDOWS="1")  # one 128^3 window per lesion keeps the job short on a CPU
    serve_log = workdir / "serve.log"
    with open(serve_log, "wb") as out:
        proc = subprocess.Popen([str(bin_dir / "msam"), "serve"], env=env, cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            serve.wait_until(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 180,
                             "msam serve (from the fresh venv)", proc)
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{_tail(serve_log)}")
        image = _phantom(workdir / "ct.nii.gz")
        with httpx.Client(base_url=base, timeout=60) as c:
            with open(image, "rb") as f:
                r = c.post("/segment", files={"image": ("ct.nii.gz", f)}, data={"prompts": prompts((22, 20, 12))})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 180
            while (job := c.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "canceled"):
                assert time.monotonic() < deadline, f"job still {job['status']} after 180 s\n{_tail(serve_log)}"
                time.sleep(0.2)
            assert job["status"] == "succeeded", (job, _tail(serve_log))
            r = c.get(f"/jobs/{job_id}/result", params={"format": "nifti"})
            assert r.status_code == 200, r.text
        (workdir / "mask.nii.gz").write_bytes(r.content)
        mask, source = nib.load(str(workdir / "mask.nii.gz")), nib.load(str(image))
        assert mask.shape == source.shape
        np.testing.assert_array_equal(mask.affine, source.affine)
        labels = np.asarray(mask.dataobj)
        assert int((labels > 0).sum()) > 0, "empty mask"
        assert labels[22, 20, 12] > 0, "the clicked voxel is not in the mask"
        assert _stop_group(proc) == 0, _tail(serve_log)
    finally:
        _stop_group(proc, timeout=10)
    print(f"whole test: {time.monotonic() - t0:.0f} s")


def test_api_image_dependency_set_answers_healthz(workdir: Path) -> None:
    t0 = time.monotonic()
    log = workdir / "pip.log"
    src = _source_copy(workdir)
    requirements = _api_image_requirements(src)
    bin_dir = _new_venv(workdir / "venv", log)
    seconds = _pip_install(bin_dir, ["-r", str(requirements)], log, cwd=src)
    seconds += _pip_install(bin_dir, ["--no-deps", "."], log, cwd=src)
    print(f"\nAPI-image venv: {time.monotonic() - t0:.0f} s (pip {seconds:.0f} s)")

    python = str(bin_dir / "python")
    missing = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                             env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert missing.stdout.strip() == "True", f"torch is importable in the API image's set\n{missing.stderr}"

    entry = "tenant-a:" + hashlib.sha256(b"s3cret").hexdigest()
    out = subprocess.run([str(bin_dir / "msam"), "hash-key", "--stdin", "tenant-a"], input="s3cret\n",
                         env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == entry, (out.stdout, entry)

    run_dir = Path(tempfile.mkdtemp(prefix="msam-inst-"))  # short path: unix socket names are limited
    redis_proc, redis_url = serve.start_redis(run_dir, log=run_dir / "redis.log")
    port = serve.free_port()
    env = _clean_env()
    env.update(MSAM_REDIS_URL=redis_url, MSAM_STORAGE_DIR=str(workdir / "storage"))
    api_log = workdir / "api.log"
    api = None
    try:
        with open(api_log, "wb") as f:
            api = subprocess.Popen([str(bin_dir / "uvicorn"), "api.main:app", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, cwd=workdir, stdout=f,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            serve.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
                             60, "uvicorn api.main:app (API image set)", api)
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{_tail(api_log)}")
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    finally:
        if api is not None:
            _stop_group(api, timeout=10)
        serve.stop(redis_proc)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"whole test: {time.monotonic() - t0:.0f} s")
