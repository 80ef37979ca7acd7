"""The served path is the measured path: the bundled model through the real service (HTTP, Redis,
a Celery worker process) gives, voxel for voxel, the masks of ``msam segment`` and of ``msam
evaluate`` for the same image and clicks - for a NIfTI upload and for a DICOM series, on oblique,
anisotropic phantoms - and the job says which model and options answered.

The phantom is one where the pipeline options matter (the stable-region prior, the boundary
refinement and the coarse view change the mask), so a service that dropped them (as a worker
that wrapped the model once did) fails here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from msam_core.checkpoint_info import file_sha256
from msam_core.checkpoints import load_model
from msam_core.cli import main as cli_main
from msam_core.cli.segment import DEFAULT_CHECKPOINT
from msam_core.io.load import load_volume
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.prompts import Point
from msam_core.pipeline.segmenter import Segmenter
from msam_train.clicks import first_click
from tests.integration.conftest import service_env
from tests.integration.harness import Service
from tests.unit.io.dicom_synth import make_ct_series, rotation

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model (run make model)")]

SHAPE = (72, 64, 36)
SPACING = np.array([0.9, 1.1, 2.2])


def _phantom_hu() -> tuple[np.ndarray, np.ndarray]:
    """``(HU [i, j, k], lesion mask)``: a 26 mm ellipsoidal lesion, +70 HU over noisy soft tissue."""
    rng = np.random.default_rng(3)
    ii, jj, kk = np.indices(SHAPE).astype(float)
    d = np.sqrt(((ii - 38) * SPACING[0]) ** 2 + ((jj - 30) * SPACING[1] / 1.2) ** 2 + ((kk - 17) * SPACING[2]) ** 2)
    lesion = d < 13.0
    return np.rint(rng.normal(40.0, 12.0, SHAPE) + 70.0 * lesion), lesion


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The phantom as a NIfTI (rotated 20 degrees about S, its first axis pointing left: an
    oblique, flipped, anisotropic grid) in an images/ + labels/ folder ``msam evaluate`` reads, as
    a DICOM series (oblique rows and columns), and its first click (the deepest lesion voxel, as
    ``msam evaluate`` places it)."""
    root = tmp_path_factory.mktemp("served")
    hu, lesion = _phantom_hu()
    affine = np.eye(4)
    affine[:3, :3] = rotation((0, 0, 1), 20.0) @ np.diag(SPACING * np.array([-1.0, 1.0, 1.0]))
    affine[:3, 3] = (30.0, -20.0, 10.0)
    for folder, data in (("images", hu.astype(np.int16)), ("labels", lesion.astype(np.uint8))):
        (root / "data" / folder).mkdir(parents=True)
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(root / "data" / folder / "case.nii.gz"))
    r = rotation((1, 1, 0), 15.0)
    series = make_ct_series(root / "dicom", shape=SHAPE, spacing=tuple(SPACING), row_dir=tuple(r[:, 0]),
                            col_dir=tuple(r[:, 1]), write_order="shuffle", pixels=(hu + 1024).astype(np.uint16))
    return {"root": root, "nifti": root / "data" / "images" / "case.nii.gz", "lesion": lesion,
            "click": [int(v) for v in first_click(lesion)], "dicom": series}


@pytest.fixture(scope="module")
def bundled_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The real service on the bundled model, as `make run` serves it (windows as msam segment's
    default), on a Redis of its own: no other test's worker takes its jobs."""
    import tempfile

    from msam_service import serve

    run_dir = Path(tempfile.mkdtemp(prefix="msam-served-"))  # short path: unix socket names are limited
    redis_proc, redis_url = serve.start_redis(run_dir, log=run_dir / "redis.log")
    tmp = tmp_path_factory.mktemp("bundled-service")
    env = service_env(tmp, redis_url, DEFAULT_CHECKPOINT, MSAM_MAX_WINDOWS="8", MSAM_JOB_SOFT_TIME_LIMIT_S="150",
                      MSAM_JOB_TIME_LIMIT_S="180", MSAM_VISIBILITY_TIMEOUT_S="240")
    svc = Service(tmp=tmp, redis_url=redis_url, env=env)
    try:
        svc.start_worker("bundled")
        svc.start_api()
        yield svc
    finally:
        svc.stop()
        serve.stop(redis_proc)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The worker runs torch on one thread (MSAM_TORCH_THREADS=1); the CLI and evaluate, run in
    this process, do too, so every path does the same arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _job(svc: Service, files, prompts: dict) -> dict:
    """A job from an upload (``files`` + the ``prompts`` form field) or, without ``files``, from the
    JSON body ``prompts`` (``{"volume_id", "prompts"}``)."""
    with svc.client() as c:
        if files is None:
            r = c.post("/segment", json=prompts)
        else:
            r = c.post("/segment", files=files, data={"prompts": json.dumps(prompts)})
        assert r.status_code == 202, r.text
        job = svc.wait_job(r.json()["job_id"], timeout=240)
    assert job["status"] == "succeeded", (job, svc.logs())
    return job


def _result(svc: Service, job: dict, fmt: str, path: Path) -> Path:
    with svc.client() as c:
        r = c.get(f"/jobs/{job['job_id']}/result", params={"format": fmt})
    assert r.status_code == 200, r.text
    path.write_bytes(r.content)
    return path


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _cli(image: Path, out: Path, positive: list, negative: list = ()) -> np.ndarray:
    points = [f"--point={x},{y},{z}" for x, y, z in positive] + [f"--point={x},{y},{z},0" for x, y, z in negative]
    assert cli_main(["segment", str(image), "-o", str(out), *points]) == 0
    return _mask(out)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def test_nifti_job_equals_msam_segment_and_msam_evaluate(bundled_service: Service, phantom: dict,
                                                         tmp_path: Path) -> None:
    click = phantom["click"]
    with open(phantom["nifti"], "rb") as f:
        job = _job(bundled_service, {"image": ("case.nii.gz", f)}, {"space": "voxel", "lesions": [{"positive": [click]}]})
    served = _mask(_result(bundled_service, job, "nifti", tmp_path / "served.nii.gz"))
    cli = _cli(phantom["nifti"], tmp_path / "cli.nii.gz", [click])
    assert served.shape == SHAPE and served.any()
    assert np.array_equal(served, cli), f"{int((served != cli).sum())} voxels differ between service and CLI"
    assert _dice(served > 0, phantom["lesion"]) > 0.8  # on the lesion, not mirrored

    # msam evaluate's first click on the same case, through --masks: the same mask
    assert cli_main(["evaluate", "--data", str(phantom["root"] / "data"), "--split", "training", "--clicks", "1",
                     "--no-baseline", "--out", str(tmp_path / "eval"), "--masks", str(tmp_path / "masks")]) == 0
    evaluated = _mask(tmp_path / "masks" / "case_lesion1_click1.nii.gz")
    assert np.array_equal(served, evaluated), f"{int((served != evaluated).sum())} voxels differ from msam evaluate"
    rows = json.loads((tmp_path / "eval" / "per_lesion.json").read_text())
    assert rows[0]["dice"] == pytest.approx(_dice(served > 0, phantom["lesion"]), abs=0.05)  # its own grid: 1.5 mm

    # which model answered: the bundled file, with the options it states
    loaded = load_model(DEFAULT_CHECKPOINT)
    assert job["model"]["sha256"] == file_sha256(DEFAULT_CHECKPOINT)
    assert job["model"]["name"] == "msam_default" and job["model"]["network_id"] == loaded.model_id
    assert job["model"]["options"] == loaded.options.to_dict()
    assert job["timings"]["prior"] > 0 and job["timings"]["boundary"] > 0  # the steps ran in the worker
    assert job["encoder_runs"] == 2  # the crop and its coarse view

    # the options matter on this phantom: the pipeline without them draws another mask
    volume = load_volume(phantom["nifti"])
    bare = Segmenter(loaded.network, PipelineOptions()).segment(volume, [Point(tuple(map(float, click)))]).labels
    assert not np.array_equal(bare, served)


def test_later_clicks_give_the_same_mask_from_service_and_cli(bundled_service: Service, phantom: dict,
                                                              tmp_path: Path) -> None:
    click = phantom["click"]
    positive, negative = [click, [click[0] + 4, click[1] - 3, click[2] + 1]], [[click[0] - 14, click[1], click[2]]]
    with bundled_service.client() as c, open(phantom["nifti"], "rb") as f:
        volume_id = c.post("/volumes", files={"image": ("case.nii.gz", f)}).json()["volume_id"]
    first = _job(bundled_service, None, {"volume_id": volume_id,
                                         "prompts": {"space": "voxel", "lesions": [{"positive": [click]}]}})
    job = _job(bundled_service, None, {"volume_id": volume_id, "prompts": {
        "space": "voxel", "lesions": [{"positive": positive, "negative": negative}]}})
    assert job["cache_hits"] == 2 and job["encoder_runs"] == 0  # the follow-up decodes from the cached embeddings
    served = _mask(_result(bundled_service, job, "nifti", tmp_path / "served.nii.gz"))
    assert np.array_equal(served, _cli(phantom["nifti"], tmp_path / "cli.nii.gz", positive, negative))
    assert served.any() and not served[tuple(negative[0])]
    assert first["encoder_runs"] + first["cache_hits"] == 2


def test_dicom_job_equals_msam_segment_and_names_the_model(bundled_service: Service, phantom: dict,
                                                          tmp_path: Path) -> None:
    series = phantom["dicom"]
    click = phantom["click"]  # the DICOM volume is the same array: voxel (column, row, slice)
    files = [("image", (f"IM{n}", open(p, "rb"), "application/dicom")) for n, p in enumerate(series.paths)]
    try:
        job = _job(bundled_service, files, {"space": "voxel", "lesions": [{"positive": [click]}]})
    finally:
        for _, (_, f, _) in files:
            f.close()
    served = _mask(_result(bundled_service, job, "nifti", tmp_path / "served.nii.gz"))
    cli = _cli(series.paths[0].parent, tmp_path / "cli.nii.gz", [click])
    assert served.any() and np.array_equal(served, cli)
    assert _dice(served > 0, phantom["lesion"]) > 0.8
    seg = pydicom.dcmread(_result(bundled_service, job, "dicom-seg", tmp_path / "seg.dcm"))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (job["model"]["name"], job["model"]["version"])


def test_info_reports_the_served_model_and_what_a_request_may_hold(bundled_service: Service) -> None:
    with bundled_service.client() as c:
        info = c.get("/info").json()
    sha = file_sha256(DEFAULT_CHECKPOINT)
    assert [m["sha256"] for m in info["models"]] == [sha]
    assert info["models"][0]["options"] == load_model(DEFAULT_CHECKPOINT).options.to_dict()
    assert info["workers"] and all(w["model"]["sha256"] == sha for w in info["workers"])
    assert info["prompts"]["types"] == ["positive", "negative", "box", "mask", "line"]
    assert info["prompts"]["spaces"] == ["voxel", "LPS", "RAS"]
    assert set(info["result_formats"]) == {"dicom-seg", "nifti", "png", "rtstruct", "mha", "sr", "fhir"}
