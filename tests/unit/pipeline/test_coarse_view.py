"""The coarse view: its grid and mappings, the contrast that picks a candidate, and its place in
the pipeline (geometry checked on an oblique, anisotropic volume)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from msam_core.io.volume import Volume
from msam_core.model import get_config
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.coarse_view import (choose, coarse_grid, contrast_to_noise, logits_to_fine,
                                            points_to_coarse)
from msam_core.pipeline.postprocess import upsample_logits
from msam_core.pipeline.preprocess import CropGrid, mask_on_grid
from msam_core.pipeline.segmenter import DictEmbeddingCache, Segmenter
from tests.unit.pipeline.phantoms import (RegionGrowDouble, centred_affine, dice, rotation, sphere_truth,
                                          spheres_image, voxel_centres_ras)


def _ball(shape, centre, radius) -> np.ndarray:
    idx = np.indices(shape, dtype=float)
    return sum((idx[i] - centre[i]) ** 2 for i in range(3)) <= radius ** 2


def test_coarse_grid_shares_the_centre_and_the_mappings_keep_every_ras_point():
    fine = CropGrid.centred(np.array([10.0, -20.0, 35.5]), size=16, spacing=1.5)
    coarse = coarse_grid(fine)
    assert coarse.size == 16 and coarse.spacing == 3.0
    middle = np.full((1, 3), 8.0)
    assert np.allclose(fine.crop_to_ras(middle), coarse.crop_to_ras(middle))
    pts = np.array([[0.0, 0.0, 0.0], [15.0, 3.0, 7.5], [2.2, 11.0, 14.9]])
    assert np.allclose(coarse.crop_to_ras(points_to_coarse(pts, fine, coarse)), fine.crop_to_ras(pts))


def test_logits_to_fine_puts_each_value_where_it_lies_in_ras():
    """A field linear in R, A and S (a different slope each, so a flipped or swapped axis shows)
    is reproduced exactly by trilinear resampling at the fine voxels' own RAS positions."""
    fine = CropGrid.centred(np.array([4.0, 7.0, -3.0]), size=16, spacing=1.5)
    coarse = coarse_grid(fine)
    slopes = np.array([1.0, -2.0, 0.5])
    coarse_ras = coarse.crop_to_ras(np.indices(coarse.shape).reshape(3, -1).T)
    field = (coarse_ras @ slopes).reshape(coarse.shape).astype(np.float32)
    fine_ras = fine.crop_to_ras(np.indices(fine.shape).reshape(3, -1).T)
    expected = (fine_ras @ slopes).reshape(fine.shape)
    assert np.allclose(logits_to_fine(field, fine, coarse), expected, atol=1e-3)


def test_logits_to_fine_is_scipys_trilinear_resampling():
    """The separable computation is SciPy's ``affine_transform`` (order 1), bit for bit, where the
    fine crop sits at a whole coarse offset; where rounding of the grids' origins puts it 1e-14
    off one, the two differ by at most one float32 rounding step; a grid that is not a coarse
    view of the other (a half-voxel shift) goes through SciPy itself."""
    from scipy import ndimage

    from msam_core.pipeline.coarse_view import _mapping

    rng = np.random.default_rng(3)
    kinds: set[str] = set()
    for _ in range(60):  # about one grid in four is "near"
        fine = CropGrid.centred(rng.uniform(-300, 300, 3), size=32, spacing=1.5)
        shifted = rng.random() < 0.25
        coarse = coarse_grid(fine)
        if shifted:
            coarse = CropGrid(origin_ras=tuple(np.asarray(coarse.origin_ras) + 1.5), size=32, spacing=3.0)
        logits = rng.normal(0, 8, coarse.shape).astype(np.float32)
        scale, offset = _mapping(fine, coarse)
        ref = ndimage.affine_transform(logits, np.full(3, scale), offset=offset, output_shape=fine.shape,
                                       order=1, mode="nearest")
        got = logits_to_fine(logits, fine, coarse)
        assert got.dtype == np.float32 and got.shape == fine.shape
        whole = bool(np.all(offset == np.round(offset)))
        kinds.add("shifted" if shifted else "whole" if whole else "near")
        if shifted or whole:
            assert np.array_equal(got, ref)
        else:
            assert np.all(np.abs(got - ref) <= np.spacing(np.abs(ref)))
    assert {"whole", "near", "shifted"} <= kinds


@pytest.mark.parametrize("size", [128, 32])
def test_low_res_to_fine_upsamples_only_the_covered_part_with_the_same_values(size):
    """The coarse view's network logits on the fine crop are those of upsampling all of them to
    the coarse crop and resampling, bit for bit, on whole-offset and on shifted grids."""
    from msam_core.pipeline.coarse_view import low_res_to_fine

    rng = np.random.default_rng(4)
    for shift in (0.0, 0.0, 0.0, 1.5):
        fine = CropGrid.centred(rng.uniform(-300, 300, 3), size=size, spacing=1.5)
        coarse = coarse_grid(fine)
        coarse = CropGrid(origin_ras=tuple(np.asarray(coarse.origin_ras) + shift), size=size, spacing=3.0)
        low = torch.from_numpy(rng.normal(0, 8, (1, 1, size // 4, size // 4, size // 4)).astype(np.float32))
        expected = logits_to_fine(upsample_logits(low, size=size), fine, coarse)
        assert np.array_equal(low_res_to_fine(low, fine, coarse), expected)


def test_contrast_to_noise_prefers_the_mask_on_the_lesions_edge():
    rng = np.random.default_rng(0)
    truth = _ball((40, 40, 40), (20, 20, 20), 6)
    crop = (rng.normal(0.0, 0.2, truth.shape) + 1.5 * truth).astype(np.float32)
    right = contrast_to_noise(crop, truth)
    too_small, too_large = _ball(truth.shape, (20, 20, 20), 3), _ball(truth.shape, (20, 20, 20), 11)
    assert right > contrast_to_noise(crop, too_small) and right > contrast_to_noise(crop, too_large)
    assert contrast_to_noise(crop[None, None], truth) == right  # a [1, 1, S, S, S] crop as the pipeline holds it
    assert contrast_to_noise(crop, np.zeros_like(truth)) == float("-inf")
    assert contrast_to_noise(crop, np.ones_like(truth)) == float("-inf")  # no shell around it
    logits = {"small": np.where(too_small, 1.0, -1.0), "right": np.where(truth, 1.0, -1.0)}
    assert choose(crop, logits) == "right"
    assert choose(crop, {"a": logits["right"], "b": logits["right"].copy()}) == "a"  # ties: the first


def test_the_option_is_off_unless_a_checkpoint_turns_it_on():
    assert PipelineOptions().coarse_view is False
    assert PipelineOptions(coarse_view=True).coarse_view is True
    with pytest.raises(ValueError, match="coarse_view"):
        PipelineOptions(coarse_view=1)
    assert "coarse_view" not in get_config("msam_small").to_dict()  # a pipeline option, not the network's
    seg = Segmenter(RegionGrowDouble(), PipelineOptions())
    assert seg.coarse_view(None, CropGrid.centred(np.zeros(3))) is None  # off: no second look


COARSE = PipelineOptions(coarse_view=True)


def _oblique_sphere(radius: float = 22.0):
    """A sphere large enough for the stand-in's 4^3-voxel blocks at 3 mm (12 mm) to draw it."""
    shape = (100, 84, 32)
    affine = centred_affine(shape, (0.8, 1.1, 3.0), rotation((1, 1, 0), 25.0), (4.0, -6.0, 10.0))
    centre = np.array([12.0, -2.0, 14.0])
    image = spheres_image(shape, affine, [(centre, radius)], edge_mm=2.0)
    return Volume(image, affine), sphere_truth(shape, affine, centre, radius), centre, affine


def test_the_coarse_view_sees_the_lesion_in_place_on_an_oblique_anisotropic_volume():
    """The coarse path alone - its crop, its clicks, its logits back on the fine crop - puts the
    lesion where the fine view does, not mirrored."""
    volume, truth, centre, affine = _oblique_sphere()
    seg = Segmenter(RegionGrowDouble(), COARSE, cache=DictEmbeddingCache())
    sampler = seg.sampler(volume)
    grid = CropGrid.centred(centre)
    view = seg.coarse_view(sampler, grid)
    assert view is not None and view.grid.spacing == 2 * grid.spacing
    click = grid.ras_to_crop(centre)
    low = seg.predict(view.embedding, points_to_coarse(click, grid, view.grid), np.array([1]))
    seen = logits_to_fine(upsample_logits(low, size=128), grid, view.grid) > 0
    on_grid = mask_on_grid(truth, volume, grid)
    assert dice(seen, on_grid) > 0.85
    mirrored = np.flip(on_grid, axis=0) & ~on_grid
    assert (seen & mirrored).sum() < 0.05 * seen.sum()


def test_click_keeps_one_candidate_and_feeds_back_the_fine_logits():
    volume, truth, centre, _ = _oblique_sphere()
    double = RegionGrowDouble()
    seg = Segmenter(double, COARSE, cache=DictEmbeddingCache())
    sampler = seg.sampler(volume)
    window = seg.prepare(sampler, SimpleNamespace(center_ras=centre))
    state = seg.open_crop(window.image, window.grid, sampler=sampler)
    view = state.coarse
    assert double.encode_calls == 2 and view is not None
    click, labels = window.grid.ras_to_crop(centre), np.array([1])
    logits = seg.click(state, click, labels, whole=True)  # every voxel computed, to compare values
    assert np.array_equal(seg.click(state, click, labels) > 0, logits > 0)
    embedding = state.embedding
    fine = upsample_logits(seg.predict(embedding, click, labels), size=128)
    assert torch.equal(state.low_res, seg.predict(embedding, click, labels))
    seen = logits_to_fine(upsample_logits(seg.predict(view.embedding, points_to_coarse(click, window.grid, view.grid),
                                                       labels), size=128), window.grid, view.grid)
    assert np.array_equal(logits, fine) or np.allclose(logits, (fine + seen) / 2)
    assert dice(logits > 0, mask_on_grid(truth, volume, window.grid)) > 0.85
    # a second look at the same window comes from the cache
    again = seg.coarse_view(sampler, window.grid)
    assert double.encode_calls == 2 and torch.equal(again.embedding, view.embedding)


def test_segment_with_the_coarse_view_returns_the_lesion_on_the_input_grid():
    volume, truth, centre, affine = _oblique_sphere()
    from msam_core.pipeline.prompts import Point

    result = Segmenter(RegionGrowDouble(), COARSE).segment(volume, [Point(tuple(centre), space="RAS")])
    mask = result.labels > 0
    assert dice(mask, truth) > 0.85
    # centred on the lesion in RAS; its mirror image about the volume's centre lies 20 mm away
    centroid = voxel_centres_ras(truth.shape, affine)[mask].mean(0)
    mirrored = 2 * np.array([4.0, -6.0, 10.0]) - centre
    assert np.linalg.norm(centroid - centre) < 2.0 < 10.0 < np.linalg.norm(centroid - mirrored)
