"""Preprocessing as upstream trained with it: 1.5 mm RAS crop, CT clamp, z-score over > 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msam_core.io.volume import Volume
from msam_core.pipeline.postprocess import bbox_slices, foreground_bbox, upsample_block, upsample_logits
from msam_core.pipeline.preprocess import CropGrid, VolumeSampler, is_ct, normalize_crop
from tests.unit.pipeline.phantoms import centred_affine, rotation, voxel_centres_ras


def test_crop_grid_is_1_5mm_ras_centred_on_the_prompt():
    grid = CropGrid.centred(np.array([10.0, -4.0, 7.5]))
    assert grid.shape == (128, 128, 128)
    np.testing.assert_allclose(grid.affine[:3, :3], np.eye(3) * 1.5)
    np.testing.assert_allclose(grid.crop_to_ras([[64, 64, 64]]), [[10.0, -4.0, 7.5]])
    np.testing.assert_allclose(grid.ras_to_crop([[10.0 + 3.0, -4.0, 7.5]]), [[66, 64, 64]])


def test_crop_samples_the_input_at_the_right_world_positions():
    """A linear ramp along world R is reproduced exactly (linear interpolation of a linear
    function), whatever the storage; outside the image the crop is 0 (upstream's padding)."""
    shape = (60, 80, 30)
    affine = centred_affine(shape, (1.2, 0.8, 2.5), rotation((1, 2, 3), 35.0), (3.0, 2.0, 1.0))
    world = voxel_centres_ras(shape, affine)
    ramp = (world[..., 0] + 2 * world[..., 1] - world[..., 2] + 500.0).astype(np.float32)
    sampler = VolumeSampler(Volume(ramp, affine, modality="MR"))
    grid = CropGrid.centred(np.array([3.0, 2.0, 1.0]))
    raw = sampler.raw_crop(grid)
    crop_world = voxel_centres_ras(grid.shape, grid.affine)
    expected = crop_world[..., 0] + 2 * crop_world[..., 1] - crop_world[..., 2] + 500.0
    inside = sampler.inside_image(grid, np.indices(grid.shape).reshape(3, -1).T).reshape(grid.shape)
    # well inside the image (away from the last half voxel, where ITK treats it as outside)
    core = np.linalg.norm(crop_world - [3.0, 2.0, 1.0], axis=-1) < 25
    np.testing.assert_allclose(raw[core], expected[core], rtol=1e-5)
    assert np.all(raw[~inside] == 0)
    tensor = sampler.crop(grid)
    assert tensor.shape == (1, 1, 128, 128, 128) and tensor.dtype == torch.float32


def test_ct_detection_and_normalisation():
    affine = np.eye(4)
    ct_like = np.full((10, 10, 10), -1000, np.int16)
    assert is_ct(Volume(ct_like, affine))
    assert not is_ct(Volume(ct_like, affine, modality="MR"))
    assert is_ct(Volume(np.zeros((4, 4, 4), np.float32), affine, modality="CT"))
    assert not is_ct(Volume(np.full((4, 4, 4), 300, np.uint16), affine))

    crop = np.array([-3000.0, -1000.0, 0.0, 100.0, 300.0, 3000.0], np.float32)
    out = normalize_crop(crop, ct=True)
    clamped = np.clip(crop, -1000, 1000)
    positive = clamped[clamped > 0]
    np.testing.assert_allclose(out, (clamped - positive.mean()) / positive.std(), rtol=1e-5)
    mr = normalize_crop(crop[2:], ct=False)
    np.testing.assert_allclose(mr, (crop[2:] - crop[3:].mean()) / crop[3:].std(), rtol=1e-5)
    assert np.all(normalize_crop(np.zeros(5, np.float32), ct=False) == 0)


def test_upsample_is_trilinear_align_corners_false():
    low = torch.zeros(1, 1, 32, 32, 32)
    low[0, 0, 16, 16, 16] = 8.0
    up = upsample_logits(low)
    assert up.shape == (128, 128, 128)
    ref = torch.nn.functional.interpolate(low, size=(128,) * 3, mode="trilinear", align_corners=False)
    np.testing.assert_allclose(up, ref[0, 0].numpy())


def test_upsample_is_the_exact_trilinear_value_rounded_once():
    """The separable float64 upsampling is ``F.interpolate`` on the float64 logits, rounded to
    float32, bit for bit (whole arrays, odd blocks, factors 2 and 4); other sizes are
    ``F.interpolate``'s float32 pass itself."""
    rng = np.random.default_rng(3)
    low = torch.from_numpy(rng.normal(0, 6, (1, 1, 32, 32, 32)).astype(np.float32))
    low[0, 0, :4] = 0.0  # flat and exactly-zero stretches as well
    exact = torch.nn.functional.interpolate(low.double(), size=(128,) * 3, mode="trilinear",
                                            align_corners=False)[0, 0].numpy().astype(np.float32)
    up = upsample_logits(low)
    assert up.dtype == np.float32 and up.flags.c_contiguous
    assert np.array_equal(up, exact)
    single = torch.nn.functional.interpolate(low, size=(128,) * 3, mode="trilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(up, single.numpy(), rtol=0, atol=1e-5)
    for shape, factor in (((5, 7, 3), 4), ((2, 9, 6), 2), ((1, 4, 4), 4)):
        block = rng.normal(0, 6, shape).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(block).double()[None, None],
                                              size=tuple(factor * n for n in shape), mode="trilinear",
                                              align_corners=False)[0, 0].numpy().astype(np.float32)
        assert np.array_equal(upsample_block(block, factor), ref)
    with pytest.raises(ValueError, match="power of two"):
        upsample_block(np.zeros((2, 2, 2), np.float32), 3)
    other = torch.nn.functional.interpolate(low, size=(96,) * 3, mode="trilinear", align_corners=False)[0, 0]
    assert np.array_equal(upsample_logits(low, size=96), other.numpy())


def test_foreground_bbox_is_the_span_of_the_true_voxels():
    rng = np.random.default_rng(8)
    for shape in ((7, 5, 9), (1, 1, 1), (12, 3, 4)):
        for density in (0.0, 0.002, 0.05, 1.0):
            mask = rng.random(shape) < density
            if density == 0.002:
                mask[tuple(rng.integers(0, n) for n in shape)] = True  # a single voxel at least
            box = foreground_bbox(mask)
            if not mask.any():
                assert box is None and bbox_slices(mask) is None
                continue
            hits = np.argwhere(mask)
            assert np.array_equal(box[0], hits.min(0)) and np.array_equal(box[1], hits.max(0))
            grown = bbox_slices(mask, margin=2)
            assert grown == tuple(slice(int(max(a - 2, 0)), int(min(b + 3, n)))
                                  for a, b, n in zip(hits.min(0), hits.max(0), shape))
