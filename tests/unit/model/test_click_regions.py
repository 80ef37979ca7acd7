"""The intensity regions grown from the clicks (msam_core.model.click_regions) and their wiring."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from msam_core.model import build_model, get_config
from msam_core.model.click_regions import SCALES, _dilate, click_regions, pooled_intensity


def _spheres() -> torch.Tensor:
    """Noisy crop: a bright sphere (radius 20 voxels) at the centre and a disconnected sphere of
    the same intensity (radius 8) near the +z edge; background 0, lesions 1."""
    g = torch.Generator().manual_seed(0)
    axis = torch.arange(128.0)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    image = torch.zeros(128, 128, 128)
    image[(x - 64) ** 2 + (y - 64) ** 2 + (z - 64) ** 2 < 20**2] = 1.0
    image[(x - 64) ** 2 + (y - 64) ** 2 + (z - 110) ** 2 < 8**2] = 1.0
    return (image + 0.05 * torch.randn(image.shape, generator=g))[None, None]


def test_dilate_is_a_3x3x3_maximum_filter():
    x = torch.rand(2, 3, 9, 10, 11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_dilate(x), F.max_pool3d(x, 3, stride=1, padding=1))


def test_region_from_a_click_covers_its_lesion_and_not_a_disconnected_lookalike():
    pooled = pooled_intensity(_spheres())
    assert pooled.shape == (1, 1, 32, 32, 32)
    regions = click_regions(pooled, torch.tensor([[[64.0, 64.0, 64.0]]]), torch.tensor([[1]]), img_size=128)
    assert regions.shape == (1, 2 * len(SCALES), 32, 32, 32)
    assert regions.min() >= 0 and regions.max() <= 1
    sphere = F.avg_pool3d((_spheres() > 0.5).float(), 4)[0, 0] > 0.9  # cells fully inside a sphere
    sphere[..., 22:] = False  # the big one only
    for s in range(len(SCALES)):
        r = regions[0, s]
        assert r[sphere].min() > 0.5, "the clicked lesion is inside its region at every scale"
        assert r[16, 16, 27] < 1e-3, "the same intensity, not connected to the click, stays out"
        assert r[2, 2, 2] < 1e-3, "background of another intensity stays out"
    # no negative click: the negative channels are exactly zero
    assert torch.equal(regions[0, len(SCALES):], torch.zeros(len(SCALES), 32, 32, 32))


def test_negative_clicks_grow_their_own_region_and_outside_clicks_are_ignored():
    pooled = pooled_intensity(_spheres())
    pts = torch.tensor([[[64.0, 64.0, 64.0], [8.0, 8.0, 8.0], [-40.0, 64.0, 64.0]]])
    regions = click_regions(pooled, pts, torch.tensor([[1, 0, 1]]), img_size=128)
    neg = regions[0, len(SCALES)]
    assert neg[2, 2, 2] == 1.0 and neg[5, 5, 5] > 0.5, "background around the negative click"
    assert neg[16, 16, 16] < 1e-3, "the lesion is not background-like"
    # the third click lies outside the crop: the positive regions equal those of the first alone
    alone = click_regions(pooled, pts[:, :1], torch.tensor([[1]]), img_size=128)
    assert torch.equal(regions[0, : len(SCALES)], alone[0, : len(SCALES)])


def test_axis_order_of_the_clicks_is_the_tensors():
    """A click given as (x, y, z) crop voxels indexes tensor axes 2, 3, 4 in that order: the
    click at the small sphere's centre (64, 64, 110) grows it; the same numbers swapped do not."""
    pooled = pooled_intensity(_spheres())
    right = click_regions(pooled, torch.tensor([[[64.0, 64.0, 110.0]]]), torch.tensor([[1]]), img_size=128)
    swapped = click_regions(pooled, torch.tensor([[[110.0, 64.0, 64.0]]]), torch.tensor([[1]]), img_size=128)
    assert right[0, 0, 16, 16, 27] == 1.0 and right[0, 0, 16, 16, 16] < 1e-3
    assert swapped[0, 0, 16, 16, 27] < 1e-3


def test_click_regions_fold_the_pooled_crop_and_train_the_region_weights():
    model = build_model(replace(get_config("msam_small"), click_regions=True))
    c = model.config.prompt_embed_dim // 8
    assert model.high_res.channels == c + 1
    assert model.embedding_channels == model.config.prompt_embed_dim + (c + 1) * 64
    assert model.high_res.fuse.in_channels == c + 2 + 2 * len(SCALES)
    image = _spheres()
    model.train()
    out = model.decode(model.encode(image), torch.tensor([[[64.0, 64.0, 64.0]]]), torch.ones(1, 1, dtype=torch.long))
    out.mean().backward()
    grad = model.high_res.fuse.weight.grad[:, c + 2 :]  # the region channels' columns
    assert grad.abs().sum() > 0
    # without the flag (msam_small's default) the stem is as before
    plain = build_model("msam_small")
    assert plain.high_res.channels == c and plain.high_res.fuse.in_channels == c + 2
    with pytest.raises(ValueError, match="click_regions needs high_res_features"):
        replace(get_config("msam_small"), high_res_features=False, click_regions=True)
