"""Metrics agree with hand-computed values; simulated clicks land where they should."""

from __future__ import annotations

import numpy as np
import torch

from msam_core.train.clicks import first_click, next_click, random_error_clicks
from msam_core.train.evaluate import Row, dice_nsd, region_growing, stable_region_growing, summarise


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_matches_hand_computation() -> None:
    shape = (40, 40, 40)
    gt = _box(shape, (10, 10, 10), (20, 20, 20))  # 1000 voxels
    pred = _box(shape, (15, 10, 10), (25, 20, 20))  # 1000 voxels, 500 shared
    dice, _ = dice_nsd(pred, gt)
    assert dice == 2 * 500 / 2000
    pred2 = _box(shape, (10, 10, 10), (20, 20, 15))  # 500 voxels, all inside
    assert abs(dice_nsd(pred2, gt)[0] - 2 * 500 / 1500) < 1e-6
    assert dice_nsd(gt, gt) == (1.0, 1.0)
    assert dice_nsd(np.zeros(shape, bool), gt) == (0.0, 0.0)


def test_nsd_tolerance() -> None:
    shape = (40, 40, 40)
    gt = _box(shape, (10, 10, 10), (20, 20, 20))
    shifted1 = _box(shape, (11, 10, 10), (21, 20, 20))  # 1 voxel = 1.5 mm off
    shifted4 = _box(shape, (14, 10, 10), (24, 20, 20))  # 6 mm off
    assert dice_nsd(shifted1, gt, spacing=1.5, tolerance_mm=2.0)[1] == 1.0
    _, nsd = dice_nsd(shifted4, gt, spacing=1.5, tolerance_mm=2.0)
    assert 0.0 < nsd < 0.9


def test_first_and_next_clicks() -> None:
    shape = (30, 30, 30)
    gt = _box(shape, (5, 5, 5), (16, 16, 16))
    assert tuple(first_click(gt)) == (10, 10, 10)
    pred = gt.copy()
    assert next_click(pred, gt) is None
    pred[5:16, 5:16, 11:16] = False  # a missed slab -> positive click in it
    point, label = next_click(pred, gt)
    assert label == 1 and gt[tuple(point)] and not pred[tuple(point)]
    pred = gt | _box(shape, (20, 20, 20), (28, 28, 28))  # a false-positive blob -> negative click
    point, label = next_click(pred, gt)
    assert label == 0 and pred[tuple(point)] and not gt[tuple(point)]


def test_random_error_clicks_label_their_error() -> None:
    gt = torch.zeros(3, 1, 16, 16, 16, dtype=torch.bool)
    gt[:, :, 4:12, 4:12, 4:12] = True
    pred = torch.zeros_like(gt)
    pred[1] = gt[1]
    pred[1, :, 0:3, 0:3, 0:3] = True  # only false positives
    pred[2] = gt[2]  # perfect
    g = torch.Generator().manual_seed(0)
    points, labels = random_error_clicks(pred, gt, g)
    assert points.shape == (3, 1, 3) and labels.shape == (3, 1)
    p0 = tuple(int(v) for v in points[0, 0])
    assert labels[0, 0] == 1 and gt[0, 0][p0]
    p1 = tuple(int(v) for v in points[1, 0])
    assert labels[1, 0] == 0 and pred[1, 0][p1] and not gt[1, 0][p1]
    assert labels[2, 0] == 1 and gt[2, 0][tuple(int(v) for v in points[2, 0])]


def test_region_growing_finds_a_bright_blob_and_respects_negative_clicks() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 0.1, (48, 48, 48)).astype(np.float32)
    blob = _box(image.shape, (16, 16, 16), (30, 30, 30))
    image[blob] += 3.0
    grown = region_growing(image, np.array([[22.0, 22.0, 22.0]]), np.array([1]))
    assert dice_nsd(grown, blob)[0] > 0.7
    cut = region_growing(image, np.array([[22.0, 22.0, 22.0], [29.0, 22.0, 22.0]]), np.array([1, 0]))
    assert cut.sum() < grown.sum() and not cut[29, 22, 22]


def test_stable_region_baseline_is_the_prior_alone_with_negative_clicks_cutting_it() -> None:
    from msam_core.pipeline.region_prior import RegionPrior

    rng = np.random.default_rng(0)
    image = rng.normal(0, 0.1, (48, 48, 48)).astype(np.float32)
    blob = _box(image.shape, (16, 16, 16), (30, 30, 30))
    image[blob] += 3.0
    prior = RegionPrior(image)
    grown = stable_region_growing(prior, np.array([[22.0, 22.0, 22.0]]), np.array([1]))
    assert np.array_equal(grown, prior.region((22.0, 22.0, 22.0))) and dice_nsd(grown, blob)[0] > 0.7
    cut = stable_region_growing(prior, np.array([[22.0, 22.0, 22.0], [29.0, 22.0, 22.0]]), np.array([1, 0]))
    assert cut.sum() < grown.sum() and not cut[29, 22, 22] and cut[22, 22, 22]
    assert np.array_equal(prior.region((22.0, 22.0, 22.0)), grown)  # the cached region is not cut
    # a click on the uniform background: no stable region, an empty mask
    assert not stable_region_growing(prior, np.array([[3.0, 3.0, 3.0]]), np.array([1])).any()


def test_summary_means_by_group_and_lesion_size() -> None:
    def row(lesion, organ, diameter, method, clicks, dice):
        return Row("validation", "c", lesion, "s", "CT", organ, diameter, 10, method, clicks, dice, dice)

    rows = []
    for lesion, organ, diameter, dices in ((1, "liver", 6.0, (0.2, 0.6)), (2, "liver", 15.0, (0.5, 0.4)),
                                           (3, "lung", 30.0, (0.8, 0.9))):
        for c, d in enumerate(dices, start=1):
            rows.append(row(lesion, organ, diameter, "msam", c, d))
    summary = summarise(rows, clicks=2)
    groups = summary["groups"]
    assert groups["all"]["msam"]["dice"] == [round((0.2 + 0.5 + 0.8) / 3, 4), round((0.6 + 0.4 + 0.9) / 3, 4)]
    # best so far: lesion 2 keeps its 0.5 after the worse second click
    assert groups["all"]["msam"]["dice_best_so_far"][1] == round((0.6 + 0.5 + 0.9) / 3, 4)
    assert groups["organ=liver"]["msam"]["dice"] == [0.35, 0.5]
    assert groups["diameter=<10mm"]["msam"]["dice"] == [0.2, 0.6]
    assert groups["diameter=10-20mm"]["msam"]["lesions"] == 1
    assert groups["diameter=>=20mm"]["msam"]["dice"] == [0.8, 0.9]
    assert "region_growing" not in groups["all"]
