"""The intensity regions grown from the clicks (msam_core.model.click_regions) and their wiring."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from msam_core.model import build_model, get_config
from msam_core.model.click_regions import SCALES, RegionCache, _dilate, click_regions, grow, pooled_intensity


def _spheres() -> torch.Tensor:
    """Noisy crop: a bright sphere (radius 20 voxels) at the centre and a disconnected sphere of
    the same intensity (radius 6) 4 voxels beyond it along +z; background 0, lesions 1."""
    g = torch.Generator().manual_seed(0)
    axis = torch.arange(128.0)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    image = torch.zeros(128, 128, 128)
    image[(x - 64) ** 2 + (y - 64) ** 2 + (z - 64) ** 2 < 20**2] = 1.0
    image[(x - 64) ** 2 + (y - 64) ** 2 + (z - 94) ** 2 < 6**2] = 1.0
    return (image + 0.05 * torch.randn(image.shape, generator=g))[None, None]


def test_dilate_is_a_3x3x3_maximum_filter():
    x = torch.rand(2, 3, 9, 10, 11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_dilate(x), F.max_pool3d(x, 3, stride=1, padding=1))


def test_region_from_a_click_covers_its_lesion_and_not_a_disconnected_lookalike():
    pooled = pooled_intensity(_spheres())
    assert pooled.shape == (1, 1, 64, 64, 64)
    regions = click_regions(pooled, torch.tensor([[[64.0, 64.0, 64.0]]]), torch.tensor([[1]]), img_size=128)
    assert regions.shape == (1, 2 * len(SCALES), 32, 32, 32)
    assert regions.min() >= 0 and regions.max() <= 1
    sphere = F.avg_pool3d((_spheres() > 0.5).float(), 4)[0, 0] > 0.9  # cells fully inside a sphere
    sphere[..., 21:] = False  # the big one only
    for s in range(len(SCALES)):
        r = regions[0, s]
        assert r[sphere].min() > 0.5, "the clicked lesion is inside its region at every scale"
        assert r[16, 16, 23] < 1e-2, "the same intensity, 4 voxels away but not connected, stays out"
        assert r[2, 2, 2] < 1e-3, "background of another intensity stays out"
    # no negative click: the negative channels are exactly zero
    assert torch.equal(regions[0, len(SCALES):], torch.zeros(len(SCALES), 32, 32, 32))


def test_negative_clicks_grow_their_own_region_and_outside_clicks_are_ignored():
    pooled = pooled_intensity(_spheres())
    pts = torch.tensor([[[64.0, 64.0, 64.0], [8.0, 8.0, 8.0], [-40.0, 64.0, 64.0]]])
    regions = click_regions(pooled, pts, torch.tensor([[1, 0, 1]]), img_size=128)
    neg = regions[0, len(SCALES)]
    assert neg[2, 2, 2] > 0.8 and neg[5, 5, 5] > 0.5, "background around the negative click"
    assert neg[16, 16, 16] < 1e-3, "the lesion is not background-like"
    # the third click lies outside the crop: the positive regions equal those of the first alone
    alone = click_regions(pooled, pts[:, :1], torch.tensor([[1]]), img_size=128)
    assert torch.equal(regions[0, : len(SCALES)], alone[0, : len(SCALES)])


def test_axis_order_of_the_clicks_is_the_tensors():
    """A click given as (x, y, z) crop voxels indexes tensor axes 2, 3, 4 in that order: the
    click at the small sphere's centre (64, 64, 94) grows it; the same numbers swapped do not."""
    pooled = pooled_intensity(_spheres())
    right = click_regions(pooled, torch.tensor([[[64.0, 64.0, 94.0]]]), torch.tensor([[1]]), img_size=128)
    swapped = click_regions(pooled, torch.tensor([[[94.0, 64.0, 64.0]]]), torch.tensor([[1]]), img_size=128)
    assert right[0, 0, 16, 16, 23] > 0.9 and right[0, 0, 16, 16, 16] < 1e-3
    assert swapped[0, 0, 16, 16, 23] < 1e-3


def test_click_regions_fold_the_pooled_crop_and_train_the_region_weights():
    model = build_model(replace(get_config("msam_small"), click_regions=True))
    c = model.config.prompt_embed_dim // 8
    assert model.high_res.channels == c + 8  # the crop pooled per 2^3 voxels, folded to stride 4
    assert model.embedding_channels == model.config.prompt_embed_dim + (c + 8) * 64
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


def test_regions_stop_at_the_crop_and_window_edges():
    """A click at the crop's corner grows only inside the crop (the padding has no affinity), and
    no region reaches beyond its click's window, whatever the intensities."""
    flat = torch.zeros(1, 1, 64, 64, 64)  # one intensity everywhere: affinity 1
    corner = click_regions(flat, torch.tensor([[[0.0, 0.0, 0.0]]]), torch.tensor([[1]]), img_size=128)
    r = corner[0, 0]
    assert r[0, 0, 0] == 1.0 and r[8, 8, 8] == 1.0
    assert r[9, 0, 0] == 0.0 and r[0, 0, 9] == 0.0, "18 cells of 3 mm (half the window) from the click"
    centre = click_regions(flat, torch.tensor([[[64.0, 64.0, 64.0]]]), torch.tensor([[1]]), img_size=128)[0, 0]
    assert centre[16, 16, 16] == 1.0 and centre[7, 16, 16] == 1.0 and centre[6, 16, 16] == 0.0
    assert centre[16, 16, 24] == 1.0 and centre[16, 16, 25] == 0.0


def test_a_region_cache_grows_each_click_once_and_gives_the_same_regions(monkeypatch):
    """Passes with a growing list of clicks on one crop grow only the new clicks' regions, and
    the result equals growing every region afresh; the cache refuses another crop."""
    import msam_core.model.click_regions as module

    pooled = pooled_intensity(_spheres())
    pts = torch.tensor([[[64.0, 64.0, 64.0], [64.0, 64.0, 94.0], [20.0, 20.0, 20.0]]])
    labels = torch.tensor([[1, 1, 0]])
    calls = (1, 2, 2, 3)
    fresh = [click_regions(pooled, pts[:, :n], labels[:, :n], img_size=128) for n in calls]
    grown: list[int] = []
    monkeypatch.setattr(module, "grow", lambda windows, *a: (grown.append(len(windows)), grow(windows, *a))[1])
    cache = RegionCache()
    for n, expected in zip(calls, fresh):
        assert torch.equal(click_regions(pooled, pts[:, :n], labels[:, :n], img_size=128, cache=cache), expected)
    assert len(cache) == 3
    assert grown == [1, 1, 1], "the first click, then only each new one; nothing for a repeated call"
    with pytest.raises(ValueError, match="another crop"):
        click_regions(pooled + 1, pts, labels, img_size=128, cache=cache)


def test_refine_grows_each_region_once_and_matches_fresh_decodes(monkeypatch):
    """refine keeps one cache across its passes: same logits as passes that each regrow."""
    import msam_core.model.click_regions as module

    torch.manual_seed(0)
    model = build_model(replace(get_config("msam_small"), click_regions=True, region_logits=True))
    points, labels = torch.tensor([[[64.0, 64.0, 64.0], [64.0, 64.0, 94.0]]]), torch.tensor([[1, 0]])
    with torch.inference_mode():
        embedding = model.encode(_spheres())
        by_hand = None
        for _ in range(3):
            by_hand = model.decode(embedding, points, labels, by_hand)
        grown: list[int] = []
        monkeypatch.setattr(module, "grow", lambda windows, *a: (grown.append(len(windows)), grow(windows, *a))[1])
        refined = model.refine(embedding, points, labels, torch.zeros(1, 1, 32, 32, 32), iterations=3)
    assert grown == [2]
    first = model.decode(embedding, points, labels, None)
    assert torch.allclose(refined, by_hand, atol=1e-5) and not torch.allclose(refined, first, atol=1e-3)


def _padded_canvas_regions(pooled, points, labels, img_size, scales=SCALES, steps=20, window=36):
    """The regions as computed on a canvas padded by the window on every side, then cropped (the
    definition the crop-sized canvas must reproduce bit for bit)."""
    from msam_core.model.click_regions import click_index, click_inside

    b, p, n_s = pooled.shape[0], pooled.shape[2], len(scales)
    h = window // 2
    padded = F.pad(pooled.float(), (h, window - h) * 3, value=float("inf"))
    idx, inside = click_index(points, p, img_size), click_inside(points, img_size)
    out = padded.new_zeros(b, 2 * n_s, p + window, p + window, p + window)
    for i in range(b):
        for j in range(points.shape[1]):
            label = int(labels[i, j])
            if not bool(inside[i, j]) or label not in (0, 1):
                continue
            x, y, z = (int(v) for v in idx[i, j])
            r = grow(padded[i, :, x:x + window, y:y + window, z:z + window][None], scales, steps)[0]
            view = out[i, (0 if label == 1 else n_s):(n_s if label == 1 else 2 * n_s), x:x + window, y:y + window, z:z + window]
            view.copy_(torch.maximum(view, r))
    return F.avg_pool3d(out[:, :, h:h + p, h:h + p, h:h + p], 2)


def test_regions_on_a_crop_sized_canvas_equal_the_padded_canvas_bit_for_bit():
    """Clicks at the centre, near and on the crop's faces and corners, outside it, both labels,
    two crops in a batch; with and without a cache kept across calls."""
    g = torch.Generator().manual_seed(2)
    image = torch.cat([_spheres(), torch.randn(1, 1, 128, 128, 128, generator=g)])
    pooled = pooled_intensity(image)
    points = torch.tensor([[[64.0, 64.0, 64.0], [0.0, 3.0, 127.0], [127.9, 127.9, 127.9], [70.0, 10.0, 120.0],
                            [64.0, 64.0, 94.0], [-5.0, 64.0, 64.0], [30.0, 100.0, 2.0]],
                           [[5.0, 5.0, 5.0], [120.0, 64.0, 1.0], [64.0, 64.0, 64.0], [64.0, 66.0, 64.0],
                            [200.0, 0.0, 0.0], [90.0, 90.0, 30.0], [126.0, 2.0, 64.0]]])
    labels = torch.tensor([[1, 0, 1, 0, 1, 1, 0], [0, 1, 1, 0, 1, 0, 2]])
    expected = _padded_canvas_regions(pooled, points, labels, 128)
    assert torch.equal(click_regions(pooled, points, labels, img_size=128), expected)
    cache = RegionCache()
    for n in range(1, points.shape[1] + 1):  # one click more at a time, as an interaction
        kept = click_regions(pooled, points[:, :n], labels[:, :n], img_size=128, cache=cache)
    assert torch.equal(kept, expected)
    assert expected[:, :3].abs().sum() > 0 and expected[:, 3:].abs().sum() > 0


def test_regions_of_clicks_in_one_part_of_the_crop_equal_the_padded_canvas_bit_for_bit():
    """Clicks close together (only the cells their windows cover are pooled), at odd cells, near
    one corner, a lone negative, and no click in the crop at all."""
    g = torch.Generator().manual_seed(3)
    image = torch.cat([_spheres(), torch.randn(1, 1, 128, 128, 128, generator=g)])
    pooled = pooled_intensity(image)
    for points, labels in (
        (torch.tensor([[[61.0, 66.0, 71.0], [66.0, 58.0, 74.0]], [[3.0, 9.0, 5.0], [11.0, 2.0, 7.0]]]),
         torch.tensor([[1, 0], [1, 1]])),
        (torch.tensor([[[99.0, 101.0, 97.0]], [[120.0, 121.0, 3.0]]]), torch.tensor([[0], [0]])),
        (torch.tensor([[[-3.0, 64.0, 64.0]], [[64.0, 64.0, 64.0]]]), torch.tensor([[1], [2]])),
    ):
        expected = _padded_canvas_regions(pooled, points, labels, 128)
        assert torch.equal(click_regions(pooled, points, labels, img_size=128), expected)


def test_growing_on_the_cube_a_step_reaches_equals_growing_on_the_whole_window_bit_for_bit():
    """Each step on the cells it can reach gives the regions of every step on the whole window
    (max_pool3d as the 3x3x3 maximum), with cells outside the crop (+inf), fewer steps than the
    window's half and more."""
    g = torch.Generator().manual_seed(4)
    windows = torch.randn(3, 1, 36, 36, 36, generator=g) * 0.3
    windows[0, :, 25:] = float("inf")
    windows[1, :, :, :4] = float("inf")
    windows[2] = windows[2].abs() * 0.1  # near the click's intensity everywhere: regions fill the window

    def whole_window(steps: int) -> torch.Tensor:
        h = windows.shape[-1] // 2
        at = windows[:, :, h, h, h].reshape(-1, 1, 1, 1, 1)
        sigma = torch.tensor(SCALES).reshape(1, -1, 1, 1, 1)
        aff = torch.exp(-0.5 * ((windows - at) / sigma).square())
        r = torch.zeros_like(aff)
        r[:, :, h, h, h] = 1.0
        for _ in range(steps):
            r = torch.maximum(r, F.max_pool3d(r, 3, stride=1, padding=1) * aff)
        return r

    for steps in (1, 5, 20, 25):
        expected = whole_window(steps)
        assert torch.equal(grow(windows, steps=steps), expected)
    assert expected[2].min() > 0, "the last case fills the whole window"
