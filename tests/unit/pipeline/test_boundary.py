"""Full-resolution boundary refinement: the random walker's band, its seeds, and its place in the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msam_core.model import build_model, get_config
from msam_core.pipeline.boundary import mask_depth, refine_boundary, seeds
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.postprocess import upsample_logits
from msam_core.pipeline.preprocess import CropGrid
from msam_core.pipeline.segmenter import Segmenter
from tests.unit.pipeline.phantoms import dice


def _ball(shape, centre, radii) -> np.ndarray:
    idx = np.indices(shape, dtype=float)
    return sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0


def _lesion(seed: int = 0, shape=(48, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy crop with a bright ellipsoid elongated along the first axis, off-centre."""
    rng = np.random.default_rng(seed)
    truth = _ball(shape, (28, 20, 22), (10, 5, 6))
    crop = (rng.normal(0.0, 0.2, shape) + 1.0 * truth).astype(np.float32)
    return crop, truth


def _coarse_logits(truth: np.ndarray, shift=(2, 0, 0), grow: float = 2.0) -> np.ndarray:
    """A blob as the network draws it: the truth shifted, fattened and blurred, as logits."""
    from scipy import ndimage

    moved = np.roll(truth, shift, axis=(0, 1, 2))
    distance = ndimage.distance_transform_edt(~moved) - ndimage.distance_transform_edt(moved)
    return (grow - distance).astype(np.float32)


def test_the_walker_moves_a_coarse_boundary_onto_the_lesion_where_it_is_not_mirrored():
    crop, truth = _lesion()
    logits = _coarse_logits(truth)
    click = np.array([[28.0, 20.0, 22.0]])
    before = dice(logits > 0, truth)
    refined = refine_boundary(crop, logits, click, np.array([1]), band=3)
    after = dice(refined > 0, truth)
    assert before < 0.8 and after > 0.9 and after > before + 0.1
    # the lesion's own side: elongated along a as the truth, not mirrored into the empty half
    assert refined.shape == truth.shape and refined.dtype == np.float32
    assert not (refined > 0)[:10].any()
    extent = [np.ptp(np.nonzero(refined > 0)[i]) for i in range(3)]
    assert extent[0] > 1.5 * max(extent[1], extent[2])
    # a [1, 1, S, S, S] crop, as the pipeline holds it, gives the same
    assert np.array_equal(refine_boundary(crop[None, None], logits, click, np.array([1]), band=3), refined)
    # far from the band, the network's logits are kept
    assert refined[0, 0, 0] == logits[0, 0, 0] and refined[28, 20, 22] == logits[28, 20, 22]


def test_a_small_lesion_is_not_shrunk_to_its_click():
    rng = np.random.default_rng(4)
    truth = _ball((32, 32, 32), (16, 15, 17), (2.5, 2.5, 2.5))  # ~65 voxels, a 7 mm lesion
    crop = (rng.normal(0.0, 0.2, truth.shape) + 1.0 * truth).astype(np.float32)
    logits = _coarse_logits(truth, shift=(1, 0, 0), grow=1.0)
    refined = refine_boundary(crop, logits, np.array([[16.0, 15.0, 17.0]]), np.array([1]), band=2)
    assert dice(refined > 0, truth) > 0.8 and (refined > 0).sum() > 0.5 * truth.sum()


def test_seeds_inside_outside_and_the_clicks():
    mask = _ball((30, 30, 30), (15, 15, 15), (8, 8, 8))
    s = seeds(mask, np.array([[15.0, 15.0, 15.0], [2.0, 2.0, 2.0], [27.0, 27.0, 27.0]]), np.array([0, 1, 1]), band=2)
    assert s[15, 15, 15] == 2 and s[2, 2, 2] == 1 and s[27, 27, 27] == 1  # the clicks decide their voxel
    assert s[15, 15, 12] == 1 and s[15, 15, 0] == 2  # deep inside / far outside
    # the mask spans c = 7..23: the band is its 2 outer layers (7, 8) and 2 layers outside (5, 6)
    assert [int(v) for v in s[15, 15, 3:11]] == [2, 2, 0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="band"):
        seeds(mask, np.zeros((0, 3)), np.zeros(0), band=0)
    # a mask thinner than twice the band keeps the inner half of its depth as inside seeds, not
    # the click alone (a walker from one seed voxel shrinks the mask to it)
    small = _ball((30, 30, 30), (15, 15, 15), (2.5, 2.5, 2.5))
    core = seeds(small, np.array([[15.0, 15.0, 15.0]]), np.array([1]), band=3) == 1
    assert 1 < core.sum() < small.sum() and not (core & ~small).any()


def test_clicks_are_honoured_and_degenerate_masks_are_left_alone():
    crop, truth = _lesion(1)
    logits = _coarse_logits(truth, shift=(0, 0, 0), grow=1.0)
    # a negative click inside the mask and a positive one outside it: their voxels take their label
    clicks = np.array([[28.0, 20.0, 22.0], [5.0, 40.0, 40.0]])
    out = refine_boundary(crop, logits, clicks, np.array([0, 1]), band=2)
    assert out[28, 20, 22] < 0 and out[5, 40, 40] > 0
    # band 0, an empty mask, a mask that fills the crop: unchanged
    assert refine_boundary(crop, logits, clicks[:1], np.array([1]), band=0) is logits
    empty = np.full(crop.shape, -3.0, np.float32)
    assert refine_boundary(crop, empty, clicks[:1], np.array([1]), band=2) is empty
    full = np.full(crop.shape, 3.0, np.float32)
    assert refine_boundary(crop, full, clicks[:1], np.array([1]), band=2) is full
    # a uniform crop (the blank-image control): no edge to move to, and no division by its zero spread
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert refine_boundary(np.zeros_like(crop), logits, clicks[:1], np.array([1]), band=2) is logits
    with pytest.raises(ValueError, match="crop grid"):
        refine_boundary(crop[:10], logits, clicks[:1], np.array([1]), band=2)


def test_the_band_for_first_and_later_clicks_and_its_validation():
    options = PipelineOptions(boundary_band_first=0, boundary_band=2)
    assert options.boundary_band_for(np.array([1])) == 0
    assert options.boundary_band_for(np.array([1, 0])) == options.boundary_band_for(np.array([1, 1])) == 2
    assert PipelineOptions().boundary_band_for(np.array([1, 0])) == 0
    assert "boundary_band" not in get_config("msam_small").to_dict()  # a pipeline option, not the network's
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="boundary_band"):
            PipelineOptions(boundary_band=bad)


def test_click_refines_the_boundary_at_the_calibrated_band():
    torch.manual_seed(0)
    network = build_model("msam_small")
    crop, truth = _lesion(2)
    image = torch.zeros(1, 1, 128, 128, 128)
    image[0, 0, :48, :48, :48] = torch.from_numpy(crop)
    grid = CropGrid.centred(np.zeros(3))
    click = np.array([[28.0, 20.0, 22.0]])
    plain_seg = Segmenter(network, PipelineOptions())
    state = plain_seg.open_crop(image, grid)
    plain = plain_seg.click(state, click, np.array([1]))
    low = state.low_res
    assert np.array_equal(plain, upsample_logits(low, size=128))  # bands 0: the network's logits
    two, two_labels = np.vstack([click, [[100.0, 100.0, 100.0]]]), np.array([1, 0])
    two_plain = plain_seg.click(state, two, two_labels)
    seg = Segmenter(network, PipelineOptions(boundary_band_first=0, boundary_band=2))
    state = seg.open_crop(image, grid)
    first = seg.click(state, click, np.array([1]))
    later = seg.click(state, two, two_labels)
    assert np.array_equal(first, plain)  # no band for one positive click
    assert np.array_equal(later, refine_boundary(image.numpy(), two_plain, two, two_labels, band=2))
    if (two_plain > 0).any():
        assert not np.array_equal(later, two_plain)
    assert torch.equal(state.low_res, seg.predict(state.embedding, two, two_labels))  # fed back: the network's own


def test_mask_depth_on_the_bounding_box_equals_the_whole_crop():
    """The depth map computed on the mask's box (grown by a voxel) is the whole crop's, also for
    masks that touch the crop's faces, small, hollow or empty ones."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    shape = (40, 33, 27)
    masks = [np.zeros(shape, bool), np.ones(shape, bool)]
    for _ in range(12):
        m = np.zeros(shape, bool)
        lo = rng.integers(0, np.asarray(shape) - 2)
        hi = np.minimum(lo + rng.integers(1, 20, 3), shape)
        m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random(tuple(hi - lo)) > 0.2
        masks.append(m)
    edge = np.zeros(shape, bool)
    edge[:6, 10:20, -5:] = True  # touches two faces
    edge[2, 12, -2] = False  # a hole
    masks.append(edge)
    for m in masks:
        np.testing.assert_array_equal(mask_depth(m), ndimage.distance_transform_edt(m))


def _whole_crop_seeds(mask, points, labels, band):
    """The seed map as computed on the whole crop (the definition the box-restricted one keeps)."""
    from scipy import ndimage

    from msam_core.pipeline.boundary import _click_voxels

    out = np.zeros(mask.shape, np.int32)
    out[~ndimage.binary_dilation(mask, iterations=band)] = 2
    depth = ndimage.distance_transform_edt(mask)
    out[depth > min(band, depth.max() / 2)] = 1
    for voxel, label in _click_voxels(points, labels, mask.shape):
        out[voxel] = 1 if label == 1 else 2
    return out


def _whole_crop_refine(crop, logits, points, labels, band, walk):
    """The walker as defined on the whole crop: the seeds' box found on the whole seed map, the
    probabilities from ``walk(image_box, seeds_box)`` (the computation the restricted one must
    reproduce)."""
    from msam_core.pipeline.boundary import CLICK_LOGIT, MAX_LOGIT, _click_voxels

    image = np.asarray(crop, np.float64)
    image = image.reshape(image.shape[-3:])
    mask = logits > 0
    if not mask.any():
        return logits
    seed = _whole_crop_seeds(mask, points, labels, band)
    reach = np.argwhere(seed != 2)
    lo = np.maximum(reach.min(0) - 1, 0)
    hi = np.minimum(reach.max(0) + 2, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = seed[box]
    undecided = sub == 0
    if not undecided.any() or not (sub == 1).any() or not (sub == 2).any() or not np.ptp(image[box]) > 0:
        return logits
    p = np.clip(walk(image[box], sub)[undecided], 1e-4, 1 - 1e-4)
    out = logits.astype(np.float32, copy=True)
    out[box][undecided] = np.clip(np.log(p / (1 - p)), -MAX_LOGIT, MAX_LOGIT)
    for voxel, label in _click_voxels(points, labels, mask.shape):
        out[voxel] = max(out[voxel], CLICK_LOGIT) if label == 1 else min(out[voxel], -CLICK_LOGIT)
    return out


def _skimage_walk(mode, tol=None):
    """scikit-image's ``random_walker``: the probability of label 1."""
    import warnings

    from skimage.segmentation import random_walker

    from msam_core.pipeline.boundary import BETA

    def walk(image, sub):
        with warnings.catch_warnings():
            # plain "cg" is slow without UMFPACK; probabilities overshoot [0, 1] within tolerance
            warnings.simplefilter("ignore", UserWarning)
            kwargs = {} if tol is None else {"tol": tol}
            return random_walker(image, sub, beta=BETA, mode=mode, return_full_prob=True, **kwargs)[0]

    return walk


def _walk_cases():
    """``(crop, logits, clicks, labels, band)`` of :func:`_seed_cases` on a noisy ball."""
    rng = np.random.default_rng(5)
    cases = []
    for n, (mask, clicks, labels, band) in enumerate(_seed_cases()):
        crop = (rng.normal(0.0, 0.2, mask.shape) + _ball(mask.shape, np.asarray(mask.shape) / 2, (9, 7, 8))).astype(np.float32)
        distance = ndimage_edt(~mask) - ndimage_edt(mask)
        logits = (0.5 - distance + rng.normal(0, 0.3, mask.shape)).astype(np.float32)
        cases.append((crop[None, None] if n % 2 else crop, logits, clicks, labels, band))
    return cases


def _seed_cases():
    """Masks small and large, touching the crop's faces, with clicks inside, outside (also far
    from the mask, beyond its box) and off the crop, for bands 1 to 3."""
    rng = np.random.default_rng(11)
    shape = (48, 44, 40)
    cases = []
    for n in range(10):
        centre = rng.uniform(0, np.asarray(shape)) if n % 3 else np.asarray(shape) / 2
        radii = rng.uniform(1.5, 14, 3)
        mask = _ball(shape, centre, radii) & (rng.random(shape) > 0.03)
        if n == 4:
            mask[:, :3, :] = True  # a slab along a face
        clicks = np.vstack([centre, rng.uniform(-3, np.asarray(shape) + 2, (4, 3))])
        labels = rng.integers(0, 2, len(clicks))
        labels[0] = 1
        if n == 5:
            clicks = np.vstack([clicks, clicks[1]])  # the same voxel clicked again, the other way
            labels = np.append(labels, 1 - labels[1])
        cases.append((mask, clicks, labels, 1 + n % 3))
    return cases


def test_seeds_on_the_masks_box_equal_the_whole_crops():
    from msam_core.pipeline.boundary import _seeds

    def whole(sub, box, shape):
        out = np.full(shape, 2, np.int32)
        if box is not None:
            out[box] = sub
        return out

    for mask, clicks, labels, band in _seed_cases():
        expected = _whole_crop_seeds(mask, clicks, labels, band)
        sub, box = _seeds(mask, clicks, labels, band)
        reach = np.argwhere(expected != 2)
        lo, hi = np.maximum(reach.min(0) - 1, 0), np.minimum(reach.max(0) + 2, mask.shape)
        assert box == tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        assert sub.shape == tuple(int(b - a) for a, b in zip(lo, hi)) and sub.dtype == np.int32
        np.testing.assert_array_equal(whole(sub, box, mask.shape), expected)
        np.testing.assert_array_equal(seeds(mask, clicks, labels, band), expected)
    empty = np.zeros((10, 10, 10), bool)
    sub, box = _seeds(empty, np.array([[1.0, 2.0, 3.0]]), np.array([0]), 2)
    assert box is None and sub is None and (seeds(empty, np.array([[1.0, 2.0, 3.0]]), np.array([0]), 2) == 2).all()
    sub, box = _seeds(empty, np.array([[1.0, 2.0, 3.0]]), np.array([1]), 2)
    got = whole(sub, box, empty.shape)
    assert box == (slice(0, 3), slice(1, 4), slice(2, 5)) and got[1, 2, 3] == 1 and (got == 2).sum() == 999
    # a positive click beyond the mask's reach clicked again negative is outside, and no reach
    sub, box = _seeds(empty, np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), np.array([1, 0]), 2)
    assert box is None


def test_the_walk_solves_scikit_images_system_and_follows_its_solver():
    """The band's system is scikit-image's random walker's (exact solves agree to rounding), and
    the shipped conjugate-gradient solve stays within rounding of scikit-image's."""
    from scipy.sparse.linalg import spsolve

    from msam_core.pipeline.boundary import TOLERANCE, _seeds, walk_probability, walk_system

    exact, iterative = _skimage_walk("bf"), _skimage_walk("cg", TOLERANCE)
    compared = flips = 0
    for crop, logits, clicks, labels, band in _walk_cases():
        sub, box = _seeds(logits > 0, clicks, labels, band)
        if box is None or not ((sub == 0).any() and (sub == 1).any() and (sub == 2).any()):
            continue
        image = np.asarray(crop).reshape(logits.shape)[box].astype(np.float64)
        undecided = sub == 0
        laplacian, rhs = walk_system(image, sub)
        assert laplacian.shape == (undecided.sum(),) * 2 and rhs.shape == (undecided.sum(),)
        np.testing.assert_allclose(spsolve(laplacian.tocsc(), rhs), exact(image, sub)[undecided], rtol=0, atol=1e-9)
        ours, theirs = walk_probability(image, sub)[undecided], iterative(image, sub)[undecided]
        assert np.all(walk_probability(image, sub)[~undecided] == 0)
        assert np.abs(ours - theirs).max() < 0.05
        flips += int(((ours > 0.5) != (theirs > 0.5)).sum())
        compared += int(undecided.sum())
    assert compared > 10_000 and flips <= compared // 5_000


def test_refine_boundary_equals_the_whole_crop_computation():
    """The box-restricted walk is the whole crop's, bit for bit, given the same walk; and within
    the solver's rounding of scikit-image's walker."""
    from msam_core.pipeline.boundary import walk_probability

    walked = differ = 0
    for n, (crop_in, logits, clicks, labels, band) in enumerate(_walk_cases()):
        got = refine_boundary(crop_in, logits, clicks, labels, band)
        expected = _whole_crop_refine(crop_in, logits, clicks, labels, band, walk_probability)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), f"case {n}"
        walked += not np.array_equal(got, logits)
        owned = logits.copy()
        in_place = refine_boundary(crop_in, owned, clicks, labels, band, overwrite=True)
        assert in_place is owned and np.array_equal(owned, expected)
        theirs = _whole_crop_refine(crop_in, logits, clicks, labels, band, _skimage_walk("cg", 1e-3))
        differ += int(((got > 0) != (theirs > 0)).sum())
    assert walked >= 8  # the walker ran (not only the early returns)
    assert differ <= 2


def ndimage_edt(mask):
    from scipy import ndimage

    return ndimage.distance_transform_edt(mask)
