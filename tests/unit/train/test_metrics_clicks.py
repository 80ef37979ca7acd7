"""Metrics agree with hand-computed values; simulated clicks land where they should."""

from __future__ import annotations

import numpy as np
import torch

from msam_train.clicks import first_click, next_click, random_error_clicks
from msam_train.evaluate import Row, dice_nsd, region_growing, stable_region_growing, summarise


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


def _blobs(rng: np.random.Generator, shape=(40, 33, 27)) -> list[np.ndarray]:
    """Irregular masks: inside the array, touching one edge, touching a corner, two pieces, one voxel."""
    from scipy import ndimage

    out = []
    for centre in ((20, 16, 13), (0, 16, 13), (39, 0, 26), (5, 30, 2)):
        noise = ndimage.gaussian_filter(rng.normal(size=shape), 2)
        d = np.sqrt(sum((np.indices(shape)[a] - centre[a]) ** 2 for a in range(3)))
        out.append((d < 9) & (noise > -0.05))
    two = np.zeros(shape, bool)
    two[3:9, 3:9, 3:9] = two[25:38, 20:30, 10:25] = True
    one = np.zeros(shape, bool)
    one[7, 8, 9] = True
    return out + [two, one]


def test_border_depth_on_the_bounding_box_equals_the_whole_array_transform() -> None:
    from scipy import ndimage

    from msam_train.clicks import border_depth, deepest_voxel

    for mask in _blobs(np.random.default_rng(3)):
        assert mask.any()
        for padded in (True, False):
            whole = (ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1] if padded
                     else ndimage.distance_transform_edt(mask))
            depth, box = border_depth(mask, outside_is_background=padded)
            assert np.array_equal(depth, whole[box])
            assert not whole[~mask].any()
            outside_box = np.ones(mask.shape, bool)
            outside_box[box] = False
            assert not whole[outside_box].any()  # nothing of the mask beyond the box
        full = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
        assert tuple(deepest_voxel(mask)) == np.unravel_index(int(np.argmax(full)), mask.shape)


def test_crop_centres_draw_what_the_whole_array_transform_draws() -> None:
    from scipy import ndimage

    from msam_train.data import crop_centres

    for k, mask in enumerate(_blobs(np.random.default_rng(4))):
        depth = ndimage.distance_transform_edt(mask)  # the former whole-volume computation
        idx = np.flatnonzero(depth > 0)
        p = depth.ravel()[idx]
        expected = np.random.default_rng(k).choice(idx, size=5, replace=len(idx) < 5, p=p / p.sum())
        got = crop_centres(mask, 5, np.random.default_rng(k))
        assert np.array_equal(got, np.stack(np.unravel_index(expected, mask.shape), 1))
        assert mask[tuple(got.T)].all()
