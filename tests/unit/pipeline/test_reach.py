"""Only the voxels that can be lesion are computed at full resolution: the boxes beyond which the
upsampled and resampled logits cannot be positive, the parts computed inside them (the same values
as the whole crop's), and the Segmenter's masks and positive logits against the whole crop's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msam_core.pipeline.coarse_view import coarse_grid, fine_reach, low_res_to_fine
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.postprocess import (BACKGROUND_LOGIT, box_bounds, union_box, upsample_block,
                                            upsample_logits, upsample_part, upsample_reach)
from msam_core.pipeline.preprocess import CropGrid
from msam_core.pipeline.segmenter import Segmenter
from tests.unit.pipeline.phantoms import RegionGrowDouble, centred_affine, rotation, spheres_image


def _low(rng: np.random.Generator, r: int, blobs: int = 2) -> torch.Tensor:
    """Network-like logits ``[1, 1, r, r, r]``: negative noise, with blobs of positive cells, one
    of them on the crop's edge, values near 0 on the blobs' rims, and one lone strong cell."""
    low = -np.abs(rng.normal(3.0, 2.0, (r, r, r))) - 0.01  # below 0, many just below
    for n in range(blobs):
        c = rng.integers(1, r - 1, 3)
        if n == 0:
            c[rng.integers(0, 3)] = rng.choice([0, r - 1])
        low[tuple(slice(max(int(x) - 1, 0), int(x) + 2) for x in c)] += rng.uniform(3.0, 9.0)
    low[tuple(rng.integers(0, r, 3))] = 40.0  # a lone cell that outweighs its neighbours
    return torch.from_numpy(low.astype(np.float32))[None, None]


def _outside(box, shape) -> np.ndarray:
    out = np.ones(shape, bool)
    if box is not None:
        out[box] = False
    return out


@pytest.mark.parametrize("r, size", [(32, 128), (16, 128), (32, 64), (32, 96)])
def test_upsampled_logits_beyond_the_reach_are_not_positive_and_inside_it_the_same(r, size):
    rng = np.random.default_rng(r + size)
    for _ in range(5):
        low = _low(rng, r)
        dense = upsample_logits(low, size=size)
        box = upsample_reach(low, size)
        assert box is not None and not (dense > 0)[_outside(box, dense.shape)].any()
        part = upsample_logits(low, size=size, box=box)
        assert part.dtype == np.float32 and np.array_equal(part[box], dense[box])
        assert np.all(part[_outside(box, dense.shape)] == BACKGROUND_LOGIT)
    # one positive cell in the middle reaches a few cells around it, not the crop
    low = torch.full((1, 1, r, r, r), -5.0)
    low[0, 0, r // 2, r // 2, r // 2] = 2.0
    lo, hi = box_bounds(upsample_reach(low, size))
    assert np.all(hi - lo <= 3 * size // r + 4)
    assert upsample_reach(torch.full((1, 1, r, r, r), -1.0), size) is None
    assert upsample_reach(torch.zeros((1, 1, r, r, r)), size) is None  # 0 is not lesion


def test_a_part_of_the_upsampling_has_the_values_of_the_whole():
    rng = np.random.default_rng(5)
    values = rng.normal(0, 10, (12, 9, 16)).astype(np.float32)
    for factor in (2, 4, 8):
        whole = upsample_block(values, factor)
        for _ in range(8):
            lo = rng.integers(0, np.asarray(whole.shape) - 1)
            hi = lo + 1 + rng.integers(0, np.asarray(whole.shape) - lo)
            got = upsample_part(values, factor, lo, hi)
            assert np.array_equal(got, whole[tuple(slice(a, b) for a, b in zip(lo, hi))])


@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_coarse_logits_on_the_fine_crop_beyond_their_reach_are_not_positive(shift):
    """On a :func:`coarse_grid` view (whole offset) and on a shifted one (trilinear resampling):
    beyond :func:`fine_reach` nothing is positive; inside it, and inside any box, the values are
    the whole computation's."""
    rng = np.random.default_rng(11)
    for _ in range(4):
        fine = CropGrid.centred(rng.uniform(-300, 300, 3), size=128, spacing=1.5)
        coarse = coarse_grid(fine)
        coarse = CropGrid(origin_ras=tuple(np.asarray(coarse.origin_ras) + shift), size=128, spacing=3.0)
        low = _low(rng, 32, blobs=3)
        dense = low_res_to_fine(low, fine, coarse)
        box = fine_reach(low, fine, coarse)
        assert not (dense > 0)[_outside(box, dense.shape)].any()
        if box is not None:
            assert np.array_equal(low_res_to_fine(low, fine, coarse, box)[box], dense[box])
        for _ in range(4):  # boxes that start and end on odd voxels, at the crop's edges too
            lo = rng.integers(0, 127, 3)
            hi = np.minimum(lo + rng.integers(1, 60, 3), 128)
            some = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            got = low_res_to_fine(low, fine, coarse, some)
            assert np.array_equal(got[some], dense[some])
            assert np.all(got[_outside(some, got.shape)] == BACKGROUND_LOGIT)
    if shift == 0.0:  # a coarse blob of one cell reaches a few fine voxels
        low = torch.full((1, 1, 32, 32, 32), -5.0)
        low[0, 0, 16, 16, 16] = 2.0
        lo, hi = box_bounds(fine_reach(low, fine, coarse))
        assert np.all(hi - lo <= 40)


def test_masks_and_boxes_read_only_the_box_said_to_hold_every_voxel():
    from msam_core.pipeline.postprocess import bbox_slices, foreground_bbox, positive_mask

    logits = np.full((20, 30, 40), -1.0, np.float32)
    logits[3:7, 10:12, 5] = 2.0
    within = (slice(2, 9), slice(8, 30), slice(0, 6))
    assert np.array_equal(positive_mask(logits, within), logits > 0)
    for got, expected in zip(foreground_bbox(logits > 0, within), foreground_bbox(logits > 0)):
        assert np.array_equal(got, expected)
    assert bbox_slices(logits > 0, 2, within) == bbox_slices(logits > 0, 2)
    assert foreground_bbox(logits > 0, (slice(0, 0),) * 3) is None


def test_union_of_boxes():
    a = (slice(2, 5), slice(0, 3), slice(10, 12))
    b = (slice(4, 9), slice(1, 2), slice(0, 1))
    assert union_box([a, None, b, (slice(3, 3),) * 3], (8, 8, 8)) == (slice(2, 8), slice(0, 3), slice(0, 8))
    assert all(sl.stop <= sl.start for sl in union_box([None], (8, 8, 8)))


class _NoisyDouble(RegionGrowDouble):
    """A stand-in whose logits are noise around the region-grow double's: values near 0 all over
    the blob's rim and stray positive cells elsewhere, some on the crop's edge (seeded by the
    clicks and the view)."""

    model_id = "noisy-double-v1"

    def decode(self, embedding, points, labels, mask_logits=None, cache=None) -> torch.Tensor:
        base = super().decode(embedding, points, labels, mask_logits)
        seed = int(abs(float(points.sum()) * 1000 + float(embedding.flatten()[::4097].sum()) * 10)) % 2**31
        rng = np.random.default_rng(seed)
        return (0.5 * base + _low(rng, 32, blobs=3) + 3.0).float()


def _spheres():
    shape = (70, 60, 40)
    affine = centred_affine(shape, (1.6, 1.6, 2.5), rotation((0, 0, 1), 20.0), (0.0, 0.0, 0.0))
    image = spheres_image(shape, affine, [(np.array([0.0, 0.0, 0.0]), 15.0), (np.array([30.0, 10.0, 5.0]), 8.0)])
    rng = np.random.default_rng(2)
    return image + rng.normal(0, 0.05, shape).astype(np.float32), affine


@pytest.mark.parametrize("model", [RegionGrowDouble, _NoisyDouble])
def test_the_segmenter_s_masks_and_positive_logits_are_the_whole_crops(model):
    """Prior, boundary walk and coarse view on: for every click of a sequence the mask and every
    logit > 0 equal those of computing every voxel (``whole``)."""
    from msam_core.io.volume import Volume

    image, affine = _spheres()
    volume = Volume(image, affine)
    options = PipelineOptions(prior_weight_first=1.5, prior_weight=1.0, boundary_band_first=3, boundary_band=2,
                              coarse_view=True)
    seg = Segmenter(model(), options)
    sampler = seg.sampler(volume)
    grid = CropGrid.centred(np.array([2.0, -1.0, 0.0]), size=128)
    state = seg.open_crop(sampler.crop(grid), grid, sampler=sampler)
    rng = np.random.default_rng(8)
    points, labels = [grid.ras_to_crop(np.array([[0.0, 0.0, 0.0]]))[0]], [1]
    computed = []
    for _ in range(4 if model is _NoisyDouble else 6):
        p, lab = np.asarray(points), np.asarray(labels)
        answer = seg.answer(state, p, lab)
        whole = seg.finish(state, answer, p, lab, whole=True)
        part, support = seg._finish(state, answer, p, lab)
        assert not (part > 0)[_outside(support, part.shape)].any()  # the box said to hold them does
        assert np.array_equal(whole > 0, part > 0)
        assert np.array_equal(whole[whole > 0], part[whole > 0])
        assert (whole > 0).any()
        computed.append(np.mean(part > BACKGROUND_LOGIT))  # beyond the box: the background, less the prior
        points.append(64 + rng.normal(0, 15, 3))
        labels.append(int(rng.integers(0, 2)))
    if model is RegionGrowDouble:  # a lesion a few percent of the crop: the rest is not computed
        assert max(computed) < 0.5


def test_a_lesion_over_several_windows_merges_every_window_s_whole_logits():
    """Windows that overlap are merged by value: the canvas of a lesion spanning windows is the one
    every window's whole logits give, bit for bit. A lesion in one window comes back on the
    volume's grid with the mask and positive logits of its whole window's canvas."""
    from msam_core.io.volume import Volume
    from msam_core.pipeline.postprocess import logits_to_volume_grid
    from msam_core.pipeline.prompts import Point, resolve_prompts
    from msam_core.pipeline.windows import LogitCanvas

    shape = (40, 40, 160)
    capsule = [(np.array([5.0, -3.0, z]), 40.0) for z in np.arange(-150.0, 151.0, 15.0)]
    affine = centred_affine(shape, (3.0, 3.0, 3.0), rotation((1, 0, 0), 10.0), (5.0, -3.0, 0.0))
    volume = Volume(spheres_image(shape, affine, capsule, edge_mm=3.0), affine)
    options = PipelineOptions(prior_weight_first=1.0, boundary_band_first=2, coarse_view=True)
    capsule_options = PipelineOptions(prior_weight_first=1.0, coarse_view=True)  # a walk on the capsule is slow
    big = resolve_prompts(volume, [Point((5.0, -3.0, 20.0), space="RAS")], [])[0]

    def run(force_whole: bool):
        seg = Segmenter(RegionGrowDouble(), capsule_options, max_windows=2)
        if force_whole:
            finish = seg.finish
            seg.finish = lambda state, answer, p, lab, whole=False: finish(state, answer, p, lab, whole=True)
        canvas, outcome = seg.segment_lesion(seg.sampler(volume), big)
        return canvas.merged()[0], outcome

    merged, outcome = run(False)
    reference, _ = run(True)
    assert outcome.windows > 1 and np.array_equal(merged, reference)

    small_volume = Volume(*_spheres())
    small = resolve_prompts(small_volume, [Point((30.0, 10.0, 5.0), space="RAS")], [])[0]
    seg = Segmenter(RegionGrowDouble(), options)
    crops: dict = {}
    canvas, outcome = seg.segment_lesion(seg.sampler(small_volume), small, crops=crops)
    assert outcome.windows == 1 and len(crops) == 1
    (grid, state), = crops.items()
    points, labels = seg._window_points(grid, small, LogitCanvas(base=grid), (0, 0, 0))
    whole = LogitCanvas(base=grid)
    whole.add((0, 0, 0), seg.click(state, points, labels, whole=True))
    got = logits_to_volume_grid(*canvas.merged(), small_volume)
    expected = logits_to_volume_grid(*whole.merged(), small_volume)
    assert got is not None and expected is not None and np.array_equal(got.lo, expected.lo)
    assert np.array_equal(got.logits > 0, expected.logits > 0)
    assert np.array_equal(got.logits[got.logits > 0], expected.logits[got.logits > 0])
    assert canvas.merged()[0].size < 0.1 * whole.merged()[0].size  # only the lesion's box was merged
