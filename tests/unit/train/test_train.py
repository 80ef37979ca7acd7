"""A tiny CPU training run: the crop cache matches inference, the loss goes down, runs resume."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from msam_core.checkpoints import load_checkpoint, load_model
from msam_core.pipeline.options import PipelineOptions
from msam_core.io.load import load_volume
from msam_core.model import build_model
from msam_core.pipeline.preprocess import CropGrid, VolumeSampler
from msam_train.data import CropDataset, build_cache, list_cases
from msam_train.synth import synthesize
from msam_train.trainer import TrainSettings, interaction_step, param_groups, train
from tests.unit.train.phantoms import phantom_scans


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=4, n_train=2, n_val=1, n_heldout=1, scans=phantom_scans(), log=lambda *_: None)
    return out


def test_cache_crops_are_the_inference_crops(dataset_dir) -> None:
    cache = build_cache(dataset_dir, "training", crops_per_lesion=1, seed=0, log_fn=lambda *_: None)
    index = json.loads((cache / "index.json").read_text())
    assert index["items"], "every lesion gives a crop"
    item = index["items"][0]
    case = next(c for c in list_cases(dataset_dir, "training") if c.name == item["case"])
    volume = load_volume(case.image)
    mask = np.load(cache / f"{item['stem']}_msk.npy")
    image = np.load(cache / f"{item['stem']}_img.npy")
    assert mask[64, 64, 64] == 1  # the first click (crop centre) lies in the lesion
    # recompute the crop the way Segmenter.prepare does, centred on the same voxel
    labels = np.asarray(load_volume(case.label).array)
    centre = np.asarray(item["centre_voxel"])
    assert labels[tuple(centre)] == item["lesion"]
    expected = VolumeSampler(volume).crop(CropGrid.centred(volume.voxel_to_ras(centre)[0]))[0, 0].numpy()
    np.testing.assert_allclose(image.astype(np.float32), expected, rtol=2e-3, atol=2e-3)  # float16 storage
    # second call reuses the cache
    assert build_cache(dataset_dir, "training", crops_per_lesion=1, seed=0, log_fn=lambda *_: None) == cache
    ds = CropDataset(cache, augment=True)
    img, msk, click = ds[0]
    assert img.shape == msk.shape == (1, 128, 128, 128)
    assert msk[0][tuple(int(v) for v in click)] == 1  # flips move the click with the lesion


def test_cache_does_not_depend_on_the_number_of_workers(dataset_dir, tmp_path) -> None:
    one = build_cache(dataset_dir, "training", crops_per_lesion=2, seed=1, cache_dir=tmp_path / "one", log_fn=lambda *_: None)
    two = build_cache(dataset_dir, "training", crops_per_lesion=2, seed=1, cache_dir=tmp_path / "two",
                      log_fn=lambda *_: None, workers=2)
    items_one = json.loads((one / "index.json").read_text())["items"]
    items_two = json.loads((two / "index.json").read_text())["items"]
    assert len({i["case"] for i in items_one}) == 2 and items_one == items_two
    for item in items_one:
        for suffix in ("_img.npy", "_msk.npy"):
            np.testing.assert_array_equal(np.load(one / (item["stem"] + suffix)), np.load(two / (item["stem"] + suffix)))


def test_crops_held_on_a_device_are_the_crops_read_from_disk(dataset_dir) -> None:
    cache = build_cache(dataset_dir, "training", crops_per_lesion=1, seed=0, log_fn=lambda *_: None)
    disk = CropDataset(cache, augment=True, seed=3)
    held = CropDataset(cache, augment=True, seed=3, device="cpu")
    assert held._images is not None and held._images.dtype == torch.float16
    for epoch in (0, 1, 2):
        disk.epoch = held.epoch = epoch
        for i in range(len(disk)):
            for a, b in zip(disk[i], held[i]):
                torch.testing.assert_close(a, b)
    flipped = [i for i in range(len(disk)) for epoch in range(3)
               if (setattr(disk, "epoch", epoch) or True) and disk[i][2].tolist() != [64.0, 64.0, 64.0]]
    assert flipped, "augmentation flips some crops (and moves their click)"


def test_tiny_training_run_lowers_the_loss(dataset_dir) -> None:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    cache = build_cache(dataset_dir, "training", crops_per_lesion=1, seed=0, log_fn=lambda *_: None)
    ds = CropDataset(cache, augment=False)
    image, gt, click = (x[None] for x in ds[0])
    model = build_model("msam_small").train()
    groups = param_groups(model, TrainSettings(lr=1e-3), from_pretrained=False)
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(6):
        loss, _ = interaction_step(model, image, gt, click, 2, loss_fn, rng, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses


def test_from_scratch_trains_everything_and_init_trains_the_m_sam_parts() -> None:
    model = build_model("msam_small")
    param_groups(model, TrainSettings(), from_pretrained=False)
    assert model.parameter_counts()[0] == model.parameter_counts()[1]
    groups = param_groups(model, TrainSettings(), from_pretrained=True)
    assert [g["lr"] for g in groups] == [8e-4, 8e-5]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("mea.", "high_res.", "prompt_encoder.", "mask_decoder.")) or ".attn.lora." in n for n in names)
    assert any(".attn.lora." in n for n in names) and any(n.startswith("mea.") for n in names)
    fresh = {id(p) for n, p in model.named_parameters() if n.startswith(("mea.", "high_res.")) or ".attn.lora." in n}
    assert {id(p) for p in groups[0]["params"]} == fresh  # the new parts train at the adapter LR


def test_train_writes_a_loadable_checkpoint_and_resumes(dataset_dir, tmp_path) -> None:
    s = TrainSettings(data=str(dataset_dir), out=str(tmp_path / "run"), steps=1, batch_size=1, iterations=2,
                      crops_per_lesion=1, device="cpu", warmup=1)
    path = train(s, log=lambda *_: None)
    model = load_model(path)
    assert model.network.config.name == "msam_small"
    assert model.options == PipelineOptions()  # a freshly trained network: every pipeline option off
    prov = model.meta["provenance"]
    assert prov["steps"] == 1 and prov["trained_by"] == "msam train" and prov["final"] is True
    s.steps, s.resume = 2, True
    train(s, log=lambda *_: None)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert load_model(path).meta["provenance"]["steps"] == 2
    # a run stopped after logging steps past its last save resumes from the save: those rows go
    shutil.copy(tmp_path / "run" / "last.pt", tmp_path / "at2.pt")
    s.steps = 3
    train(s, log=lambda *_: None)
    shutil.copy(tmp_path / "at2.pt", tmp_path / "run" / "last.pt")
    s.steps = 4
    train(s, log=lambda *_: None)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "checkpoints").exists()
    # --keep-checkpoints: each save also kept under its step, loadable with its provenance
    s.steps, s.keep_checkpoints = 5, True
    train(s, log=lambda *_: None)
    kept = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in kept] == ["step-000005.safetensors"]
    assert load_model(kept[0]).meta["provenance"]["steps"] == 5


def test_model_card_is_written_from_the_run_and_its_evaluation(dataset_dir, tmp_path) -> None:
    from msam_train.card import write_card
    from msam_train.evaluate import Row, evaluate, summarise, write_reports

    run = tmp_path / "run"
    s = TrainSettings(data=str(dataset_dir), out=str(run), steps=1, batch_size=1, iterations=2,
                      crops_per_lesion=1, device="cpu", warmup=1, threads=1)
    path = train(s, log=lambda *_: None)
    evaluate(dataset_dir, path, "heldout", clicks=2, out_dir=run / "eval_heldout", log=lambda *_: None,
             blank_control=True)
    # a validation report with the other-image control, written from rows (two lesions)
    rows = [Row("validation", f"case{i}", 1, "src", "CT", "liver", 12.0, 100, method, c, dice, 0.5)
            for i in range(2) for c in (1, 2)
            for method, dice in (("msam", 0.6 + 0.1 * c), ("region_growing", 0.3), ("msam_other_image", 0.2 + 0.05 * i),
                                 ("stable_region", 0.5))]
    write_reports(run / "eval_validation", rows, summarise(rows, 2))
    # ship a calibrated copy: prior weights and their table in the provenance
    from msam_core.checkpoints import save_checkpoint
    from msam_core.pipeline.region_prior import MAX_VOXELS
    from msam_train.calibrate import set_coarse_view, set_prior_weights

    model = load_model(path)
    set_prior_weights(model, 8.0, 2.0)
    set_coarse_view(model, True)
    provenance = dict(model.meta["provenance"])
    provenance["calibration"] = {"split": "validation", "clicks": 2, "prior_weight_first": 8.0, "prior_weight": 2.0,
                                 "prior_max_voxels": MAX_VOXELS,
                                 "prior_table": {"0,0": {"mean_dice": 0.4, "dice": [0.3, 0.5]},
                                                 "8,2": {"mean_dice": 0.45, "dice": [0.4, 0.5]},
                                                 "4,2": {"mean_dice": 0.46, "dice": [0.4, 0.52]}},
                                 "prior_choice": {"incumbent": "8,2", "best": "4,2", "chosen": "8,2",
                                                  "difference": 0.01, "interval": [-0.02, 0.04]},
                                 "coarse_view": {"coarse_view": True, "difference": 0.02, "interval": [-0.01, 0.05],
                                                 "table": {"off": {"mean_dice": 0.46, "dice": [0.4, 0.52]},
                                                           "on": {"mean_dice": 0.48, "dice": [0.42, 0.54]}}}}
    calibrated = save_checkpoint(model.network, run / "calibrated.safetensors", provenance, model.options)
    card = write_card(run, dataset_dir, tmp_path / "weights", command="msam train --steps 1", weights=calibrated)
    text = card.read_text()
    summary = json.loads((run / "eval_heldout" / "summary.json").read_text())
    m, r = summary["groups"]["all"]["msam"]["dice"], summary["groups"]["all"]["region_growing"]["dice"]
    assert f"Dice@1 {m[0]:.3f} (msam) vs {r[0]:.3f} (region growing)" in text
    assert "a CPU (1 threads)" in text and "from scratch" in text and "msam train --steps 1" in text
    assert "M-SAM uses 11" in text  # 2 passes < 11 is explained
    b = summary["groups"]["all"]["msam_blank_image"]["dice"]
    assert f"blank (all-zero) crop: Dice@1 {b[0]:.3f}" in text and "| all (1) | msam_blank_image |" in text
    assert "| 1-1 | " in text  # the loss curve has the one step
    assert ("Dice@1 0.700 (msam) vs 0.300 (region growing), paired difference +0.400 (95% interval +0.400 to "
            "+0.400): msam better at one click") in text  # msam compare's verdict, not the means alone
    assert "another lesion's crop with this lesion's clicks: Dice@1 0.225, Dice@2 0.225" in text
    assert "**Other-image control**" in text and "| all (2) | msam_other_image | 0.225 |" in text
    assert ("The stable-region prior alone: Dice@1 0.500, paired difference +0.200 (95% interval +0.200 to +0.200): "
            "msam better; Dice@2 0.500, paired difference +0.300") in text
    assert "weighted 8 for a lesion prompted by one positive click and 2 after further clicks" in text
    assert f"(MSER-style, 8 to {MAX_VOXELS:,} voxels)" in text  # the bound the pipeline uses, not a stale copy
    assert ("per FIRST,LATER pair: 0,0: 0.400; 8,2: 0.450; 4,2: 0.460; 4,2 scored +0.010 over the checkpoint's "
            "own 8,2 (95% interval -0.020 to +0.040), no clear gain, so 8,2 was kept)") in text and "second baseline `stable_region`" in text
    assert ("set with `msam calibrate --coarse-view on`, measured on the validation split (mean Dice over clicks 1..2: "
            "off 0.460, on 0.480, on minus off +0.020 (95% interval -0.010 to +0.050))") in text
    assert (tmp_path / "weights" / "msam_default.safetensors").read_bytes() == calibrated.read_bytes()


def test_train_all_continues_every_parameter_from_init() -> None:
    model = build_model("msam_small")
    groups = param_groups(model, TrainSettings(train_all=True, lr=2e-4), from_pretrained=True)
    assert [g["lr"] for g in groups] == [2e-4] and groups[0]["name"] == "all (continued)"
    assert model.parameter_counts()[0] == model.parameter_counts()[1]


def test_train_all_without_init_is_refused(capsys) -> None:
    from msam_core.cli import main

    assert main(["train", "--config", "msam_small", "--data", "d", "--train-all"]) == 2
    assert "--train-all continues training from --init" in capsys.readouterr().err


@pytest.mark.parametrize("axis,factor,phase", [(2, 3, 1), (0, 4, 0), (1, 2, 1)])
def test_thick_slice_augmentation_is_what_the_pipeline_makes_of_a_thick_slice_scan(axis, factor, phase) -> None:
    """A 1.5 mm volume made a thick-slice series (``msam_train.thick``, as the thick evaluation
    splits are), then cut by the pipeline's own sampler onto the 1.5 mm crop grid, equals
    :func:`thicken` of the crop of the original (away from the two ends, where the sampler sees
    outside the scan): training sees what inference sees."""
    from msam_core.io.volume import Volume
    from msam_train.data import thicken
    from msam_train.thick import thick_copy

    rng = np.random.default_rng(axis)
    size = 32
    array = rng.normal(size=(size,) * 3).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-20.0, 7.0, 3.0]
    n = (size - phase) // factor
    slabs, _, thick_affine = thick_copy(array, np.zeros(array.shape, np.uint8), affine, factor, axis, phase)
    assert slabs.shape[axis] == n
    grid = CropGrid(origin_ras=tuple(affine[:3, 3]), size=size, spacing=1.5)  # the original's own lattice
    seen = VolumeSampler(Volume(slabs, thick_affine)).raw_crop(grid)
    made = thicken(torch.from_numpy(array)[None], axis, factor, phase)[0].numpy()
    inner = [slice(None)] * 3
    inner[axis] = slice(phase + factor, phase + (n - 1) * factor)
    np.testing.assert_allclose(made[tuple(inner)], seen[tuple(inner)], atol=1e-4)
    # a thick-slice crop is smoother along its slice axis only
    assert np.abs(np.diff(made, axis=axis)).mean() < 0.6 * np.abs(np.diff(array, axis=axis)).mean()
    other = (axis + 1) % 3
    assert np.abs(np.diff(made, axis=other)).mean() > 0.3 * np.abs(np.diff(array, axis=other)).mean()


def test_thick_slice_augmentation_draws_from_the_rng_and_keeps_mask_and_click() -> None:
    from msam_train.data import augment, thicken

    image = torch.randn(1, 16, 16, 16)
    mask = (torch.rand(1, 16, 16, 16) > 0.5).float()
    click = torch.full((3,), 8.0)
    for seed in range(20):
        a = augment(image, mask, click, np.random.default_rng(seed), thick_p=1.0)
        b = augment(image, mask, click, np.random.default_rng(seed), thick_p=1.0)
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic from the rng
    plain = [augment(image, mask, click, np.random.default_rng(s))[0] for s in range(5)]
    off = [augment(image, mask, click, np.random.default_rng(s), thick_p=0.0)[0] for s in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(plain, off))  # p = 0: the augmentation as before
    # the mask keeps the true shape (only flipped), the click follows the flips
    _, m, c = augment(image, mask, click, np.random.default_rng(3), thick_p=1.0)
    assert sorted(m.unique().tolist()) == [0.0, 1.0] and m.sum() == mask.sum()
    with pytest.raises(ValueError, match="factor"):
        thicken(image, 0, 1)
    with pytest.raises(ValueError, match="factor"):
        thicken(image, 0, 3, 3)
