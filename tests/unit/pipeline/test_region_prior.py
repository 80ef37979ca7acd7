"""The stable-region prior: choice of the stable region, its geometry, and its place in the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msam_core.io.volume import Volume
from msam_core.model import build_model, get_config
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.postprocess import upsample_logits
from msam_core.pipeline.preprocess import CropGrid
from msam_core.pipeline.prompts import Point
from msam_core.pipeline.region_prior import (MAX_VOXELS, MULTIPLIERS, RegionPrior, add_prior, grown_regions,
                                             most_stable)
from msam_core.pipeline.segmenter import Segmenter
from tests.unit.pipeline.phantoms import (centred_affine, dice, rotation, sphere_truth, spheres_image,
                                          voxel_centres_ras)


def _ball(shape, centre, radii) -> np.ndarray:
    idx = np.indices(shape, dtype=float)
    return sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0


def _crop(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy 64^3 crop with a bright ellipsoid elongated along the first axis (a), off-centre."""
    rng = np.random.default_rng(seed)
    truth = _ball((64, 64, 64), (40, 26, 30), (12, 5, 6))
    crop = rng.normal(0.0, 0.15, truth.shape).astype(np.float32) + 2.0 * truth
    return crop, truth


def test_most_stable_takes_the_pair_that_changes_least_within_the_bounds():
    shape = (20, 20, 20)
    small, mid, mid2, leak = (_ball(shape, (10, 10, 10), (r, r, r)) for r in (2, 4, 4.2, 9))
    # growing tolerance: a small region, a stable one (4 -> 4.2 voxels), then a leak
    assert most_stable([small, mid, mid2, leak]) is mid2
    # the leak pair is out of bounds: a leak larger than max_voxels is never chosen
    assert most_stable([mid, leak], max_voxels=int(mid.sum())) is None
    assert most_stable([small, small], min_voxels=int(small.sum()) + 1) is None
    # equal overlap: the smaller tolerance wins
    assert most_stable([mid, mid.copy(), mid.copy()]) is not None
    first = [mid, mid.copy(), mid.copy()]
    assert most_stable(first) is first[1]


def test_region_prior_finds_the_lesion_where_it_is_not_mirrored():
    crop, truth = _crop()
    prior = RegionPrior(crop)
    region = prior.region((40.0, 26.0, 30.0))
    assert region is not None and region.shape == truth.shape
    assert dice(region, truth) > 0.9
    # elongated along a, as the truth: SimpleITK's (c, b, a) order is undone
    extent = [np.ptp(np.nonzero(region)[i]) for i in range(3)]
    assert extent[0] > 1.6 * max(extent[1], extent[2])
    # a click at the mirrored place (background) grows nothing of the lesion
    mirrored = prior.region((63 - 40.0, 26.0, 30.0))
    assert mirrored is None or not (mirrored & truth).any()


def test_a_large_lesion_gets_its_region():
    """A 48 mm lesion (at 1.5 mm: radius 16 voxels, ~17,000 voxels) is within the bound, and its
    click does not take the whole organ-sized background."""
    rng = np.random.default_rng(2)
    truth = _ball((80, 80, 80), (40, 38, 42), (16, 16, 16))
    crop = rng.normal(0.0, 0.15, truth.shape).astype(np.float32) - 1.5 * truth  # hypo-attenuating
    region = RegionPrior(crop).region((40.0, 38.0, 42.0))
    assert region is not None and dice(region, truth) > 0.9
    assert 5000 < truth.sum() <= MAX_VOXELS
    # a checkpoint calibrated at a smaller bound gets no prior for it
    assert RegionPrior(crop, max_voxels=5000).region((40.0, 38.0, 42.0)) is None


def test_growing_stops_at_the_first_region_above_the_bound_without_changing_the_choice():
    """A leak is not grown again at every larger multiplier (it would flood the crop each time),
    and the stable region chosen is the one the full sweep gives."""
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    truth = _ball((64, 64, 64), (40, 26, 30), (12, 5, 6))
    crop = (rng.normal(0.0, 0.15, truth.shape) + 0.6 * truth).astype(np.float32)  # 4 sigma: floods at 5
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(crop), 0.5)
    click = (40.0, 26.0, 30.0)
    every = grown_regions(image, click)
    sizes = [int(r.sum()) for r in every]
    bound = int(truth.sum()) * 2
    assert len(every) == len(MULTIPLIERS) and sizes[-1] > bound  # the largest multiplier floods
    stopped = grown_regions(image, click, max_voxels=bound)
    first_over = next(i for i, n in enumerate(sizes) if n > bound)
    assert len(stopped) == first_over and all(int(r.sum()) <= bound for r in stopped)
    assert all(np.array_equal(a, b) for a, b in zip(stopped, every))
    chosen = most_stable(every, max_voxels=bound)
    assert chosen is not None and dice(chosen, truth) > 0.8
    assert np.array_equal(most_stable(stopped, max_voxels=bound), chosen)
    assert np.array_equal(RegionPrior(crop, max_voxels=bound).region(click), chosen)


def test_region_prior_unites_positive_clicks_and_ignores_negative_and_outside_ones():
    crop, truth = _crop(1)
    second = _ball(crop.shape, (12, 50, 12), (4, 4, 4))
    crop = crop + 2.0 * second
    prior = RegionPrior(crop[None, None])  # a [1, 1, S, S, S] crop as the pipeline holds it
    one = prior.mask(np.array([[40.0, 26.0, 30.0]]), np.array([1]))
    both = prior.mask(np.array([[40.0, 26.0, 30.0], [12.0, 50.0, 12.0]]), np.array([1, 1]))
    assert dice(one, truth) > 0.9 and dice(both, truth | second) > 0.9
    negative = prior.mask(np.array([[40.0, 26.0, 30.0], [12.0, 50.0, 12.0]]), np.array([1, 0]))
    assert np.array_equal(negative, one)
    assert prior.mask(np.array([[40.0, 26.0, 30.0]]), np.array([0])) is None
    assert prior.mask(np.array([[-5.0, 26.0, 30.0]]), np.array([1])) is None  # outside the crop
    # a uniform crop: every region fills it (far above MAX_VOXELS), so there is no prior
    flat = RegionPrior(np.zeros((32, 32, 32), np.float32))
    assert flat.mask(np.array([[16.0, 16.0, 16.0]]), np.array([1])) is None and 32 ** 3 > MAX_VOXELS


def test_add_prior_and_the_weight_for_first_and_later_clicks():
    logits = np.full((4, 4, 4), -1.0, np.float32)
    region = np.zeros((4, 4, 4), bool)
    region[1:3, 1:3, 1:3] = True
    out = add_prior(logits, region, 3.0)
    assert out[1, 1, 1] == 2.0 and out[0, 0, 0] == -4.0
    rng = np.random.default_rng(0)  # bit for bit logits + weight * (2 prior - 1), at any weight
    noisy, inside = rng.normal(0, 10, (16, 16, 16)).astype(np.float32), rng.random((16, 16, 16)) < 0.3
    for weight in (0.37, 1.7, 8.0):
        expected = noisy + np.float32(weight) * (2 * inside.astype(np.float32) - 1)
        assert add_prior(noisy, inside, weight).dtype == np.float32
        assert np.array_equal(add_prior(noisy, inside, weight), expected)
    assert add_prior(logits, None, 3.0) is logits and add_prior(logits, region, 0.0) is logits
    with pytest.raises(ValueError, match="crop grid"):
        add_prior(logits, region[:2], 1.0)
    options = PipelineOptions(prior_weight_first=8.0, prior_weight=2.0)
    assert options.prior_weight_for(np.array([1])) == 8.0
    assert options.prior_weight_for(np.array([1, 0])) == options.prior_weight_for(np.array([1, 1])) == 2.0
    assert PipelineOptions().prior_weight_for(np.array([1])) == 0.0
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="prior_weight"):
            PipelineOptions(prior_weight=bad)
    assert PipelineOptions().prior_max_voxels == MAX_VOXELS  # one default, written in two layers
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="prior_max_voxels"):
            PipelineOptions(prior_max_voxels=bad)
    assert "prior_weight" not in get_config("msam_small").to_dict()  # a pipeline option, not the network's


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_model("msam_small")


def test_click_adds_the_calibrated_prior_to_the_upsampled_network_logits(network):
    crop, truth = _crop(2)
    image = torch.zeros(1, 1, 128, 128, 128)
    image[0, 0, :64, :64, :64] = torch.from_numpy(crop)
    grid = CropGrid.centred(np.zeros(3))
    click, labels = np.array([[40.0, 26.0, 30.0]]), np.array([1])

    def logits(options: PipelineOptions, points, labs, prior=None):
        seg = Segmenter(network, options)
        state = seg.open_crop(image, grid, prior=prior)
        return state, seg.click(state, points, labs)

    state, plain = logits(PipelineOptions(), click, labels)
    low = state.low_res
    assert np.array_equal(plain, upsample_logits(low, size=128))
    prior = RegionPrior(image.numpy())
    state, first = logits(PipelineOptions(prior_weight_first=5.0, prior_weight=1.0), click, labels, prior)
    assert torch.equal(low, state.low_res)  # the fed-back logits stay the network's own
    region = prior.mask(click, labels)
    assert np.allclose(first, plain + 5.0 * (2 * region - 1))
    two = np.vstack([click, [[100.0, 100.0, 100.0]]])
    _, later = logits(PipelineOptions(prior_weight_first=5.0, prior_weight=1.0), two, np.array([1, 0]), prior)
    _, two_plain = logits(PipelineOptions(), two, np.array([1, 0]))
    assert np.allclose(later, two_plain + 1.0 * (2 * region - 1))
    # the bound comes from the checkpoint: below the region's size the lesion's region is not taken
    _, bounded = logits(PipelineOptions(prior_weight_first=5.0, prior_max_voxels=int(region.sum()) - 1), click, labels)
    _, none = logits(PipelineOptions(prior_weight_first=5.0, prior_max_voxels=1), click, labels)
    assert ((bounded - plain) > 0).sum() < region.sum() and np.array_equal(none, plain)


def test_segment_with_a_dominant_prior_follows_the_lesion_in_an_oblique_anisotropic_volume(network):
    """With a weight no network logit reaches, the mask is the stable region: checks the prior's
    geometry through crop, click and resampling back onto a rotated, anisotropic grid."""
    shape = (60, 50, 24)
    affine = centred_affine(shape, (0.8, 1.1, 3.0), rotation((1, 1, 0), 25.0), (4.0, -6.0, 10.0))
    centre = np.array([12.0, -2.0, 14.0])
    image = spheres_image(shape, affine, [(centre, 9.0)], edge_mm=2.0)
    noise = np.random.default_rng(0).normal(0.0, 0.05 * np.ptp(image), shape)  # region growing needs texture
    volume = Volume((image + noise).astype(np.float32), affine)
    truth = sphere_truth(shape, affine, centre, 9.0)
    result = Segmenter(network, PipelineOptions(prior_weight_first=1e4)).segment(volume, [Point(tuple(centre), space="RAS")])
    mask = result.labels > 0
    # confidence-connected stops inside the blurred rim of a noisy sphere seen through 3 mm slices
    assert dice(mask, truth) > 0.6 and mask.sum() <= truth.sum()
    ras = voxel_centres_ras(shape, affine)[mask]
    assert np.linalg.norm(ras.mean(0) - centre) < 2.0  # centred on the lesion, in RAS
    assert np.linalg.norm(ras - centre, axis=1).max() < 9.0 + 3.0  # nothing beyond its rim
    mirrored = sphere_truth(shape, affine, 2 * np.array([4.0, -6.0, 10.0]) - centre, 9.0)
    assert not (mask & mirrored).any()
