"""Intensity regions grown from the clicks: a fixed (parameter-free) prompt cue for the decoder.

A single click says *where* the lesion is but not *how far* it extends. A network trained from
scratch on a CPU budget learns a blob of typical size around the click; classical region
growing (SimpleITK ``ConfidenceConnected``) instead follows the intensities and gets the extent
of a clear lesion right from one click, but leaks where the contrast is weak. This module gives
the decoder that classical cue as input channels and lets it learn when to trust them - the
approach of DeepIGeoS (Wang et al., TPAMI 2018) and MIDeepSeg (Luo et al., MedIA 2021), whose
networks take geodesic distance maps of the clicks.

On a grid of stride :data:`POOL` (2: ``P = 64``, 3 mm cells at 1.5 mm):

1. ``I``: the (input-transformed) crop, average-pooled over 2^3 voxels (:func:`pooled_intensity`).
2. Per click ``j``, in a window of :data:`WINDOW`^3 cells centred on it (lesions are at most
   ~60 mm, so the window bounds the cost, not the regions): the affinity of every cell to the
   click, ``a_j(x) = exp(-(I(x) - I(c_j))^2 / (2 s^2))``, for a few intensity scales ``s``
   (:data:`SCALES`, in units of the transformed, normalised crop; lesion-to-organ contrasts
   there are about 0.1-1).
3. Region: ``r_j = 1`` at the clicked cell, then :data:`STEPS` times
   ``r_j <- max(r_j, maxpool3x3x3(r_j) * a_j)``: ``r_j(x)`` is the best product of affinities
   along any path from the click to ``x`` - an exponentiated geodesic distance (max-product
   path), so a region does not jump to a disconnected structure of the same intensity.
4. Per label (positive, negative) the regions of its clicks are united (maximum), then averaged
   over 2^3 cells onto the decoder's stride-4 output grid (``G = 32``): the fraction of each 6 mm
   cell the region covers, so a lesion smaller than a cell still shows.

``[B, 1, P, P, P]`` pooled crop + clicks ``-> [B, 2 * len(SCALES), G, G, G]`` in ``[0, 1]``:
positives' regions first, then negatives'. A label without a click inside the crop gives zeros.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: Intensity scales ``s`` of the affinity (transformed, normalised crop units).
SCALES: tuple[float, ...] = (0.1, 0.2, 0.4)
#: Side of the voxel block pooled into one cell of the regions' grid (3 mm at 1.5 mm).
POOL = 2
#: Side of each click's window, in cells (108 mm): a region reaches at most 54 mm from its click.
WINDOW = 36
#: Propagation steps (cells): enough to fill the window along a winding path.
STEPS = 20


def click_cells(points: torch.Tensor, grid: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``points [B, N, 3]`` (crop voxels) -> the flat index of each click's cell on a ``grid^3``
    grid ``[B, N]`` (clamped into it) and whether the click lies inside the crop ``[B, N]``."""
    idx = click_index(points, grid, img_size)
    flat = idx[..., 0] * grid * grid + idx[..., 1] * grid + idx[..., 2]
    return flat, click_inside(points, img_size)


def click_index(points: torch.Tensor, grid: int, img_size: int) -> torch.Tensor:
    """``points [B, N, 3]`` (crop voxels) -> ``[B, N, 3]`` cell indices on a ``grid^3`` grid (clamped)."""
    return (points.float() * grid / img_size).floor().long().clamp(0, grid - 1)


def click_inside(points: torch.Tensor, img_size: int) -> torch.Tensor:
    """``points [B, N, 3]`` (crop voxels) -> ``[B, N]``: whether each click lies inside the crop."""
    return ((points >= 0) & (points < img_size)).all(-1)


def pooled_intensity(image: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S, S] -> [B, 1, S/2, S/2, S/2]``: mean intensity per cell of the regions' grid."""
    return F.avg_pool3d(image.float(), POOL)


def _dilate(r: torch.Tensor) -> torch.Tensor:
    """3x3x3 maximum filter of ``[B, C, X, Y, Z]`` (edges: the values inside), as three separable
    1D maxima of shifted views, each written into its output in place (several times faster
    than ``max_pool3d`` on a CPU)."""
    out = r
    for dim in (2, 3, 4):
        n = out.shape[dim]
        m = out.clone()
        for dst, src in ((m.narrow(dim, 1, n - 1), out.narrow(dim, 0, n - 1)),
                         (m.narrow(dim, 0, n - 1), out.narrow(dim, 1, n - 1))):
            torch.maximum(dst, src, out=dst)
        out = m
    return out


def grow(windows: torch.Tensor, scales: tuple[float, ...] = SCALES, steps: int = STEPS) -> torch.Tensor:
    """``windows [K, 1, W, W, W]`` (intensity, the click at the centre cell ``W // 2``; cells
    outside the crop ``+inf``) ``-> [K, len(scales), W, W, W]`` regions in ``[0, 1]``.

    After ``s`` steps a region is 0 farther than ``s`` cells (Chebyshev) from the click, so step
    ``s`` is computed on the cube of cells within ``s`` of it: the cells beyond it stay 0, as
    they would on the whole window (the cube's neighbours outside it are 0 and the regions are
    not negative, so the maximum filter gives the same values on the cube)."""
    k, w = windows.shape[0], windows.shape[-1]
    h = w // 2
    at = windows[:, :, h, h, h].reshape(k, 1, 1, 1, 1)
    sigma = torch.tensor(scales, dtype=windows.dtype, device=windows.device).reshape(1, -1, 1, 1, 1)
    aff = torch.exp(-0.5 * ((windows - at) / sigma).square())  # [K, S, W, W, W]; 0 outside the crop
    r = torch.zeros_like(aff)
    r[:, :, h, h, h] = 1.0
    for step in range(1, steps + 1):
        lo, hi = max(h - step, 0), min(h + step + 1, w)
        cube = (slice(None), slice(None)) + (slice(lo, hi),) * 3
        near = r[cube]
        torch.maximum(near, _dilate(near).mul_(aff[cube]), out=near)
    return r


class RegionCache:
    """Each click's grown region on one crop (batch), kept across decoder passes.

    Growing is nearly all of the regions' cost, and a click's region depends only on the crop
    and the click's cell: with a cache, refinement passes and a growing list of clicks (an
    interaction, training's simulated clicks) grow each click once instead of on every pass.
    A cache belongs to the crop it first saw and refuses another (a different pooled crop).
    """

    def __init__(self) -> None:
        self._regions: dict[tuple, torch.Tensor] = {}
        self._fingerprint: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._regions)

    def bind(self, pooled: torch.Tensor) -> None:
        """Remember ``pooled``'s per-row sums on first use; raise if a later crop differs."""
        fingerprint = pooled.detach().double().flatten(1).sum(1)
        if self._fingerprint is None:
            self._fingerprint = fingerprint
        elif fingerprint.shape != self._fingerprint.shape or not torch.equal(fingerprint, self._fingerprint):
            raise ValueError("this RegionCache holds another crop's regions; use one cache per embedding")

    def get(self, key: tuple) -> torch.Tensor | None:
        return self._regions.get(key)

    def put(self, key: tuple, region: torch.Tensor) -> None:
        self._regions[key] = region


@torch.no_grad()
def click_regions(pooled: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, img_size: int,
                  scales: tuple[float, ...] = SCALES, steps: int = STEPS, window: int = WINDOW,
                  cache: RegionCache | None = None) -> torch.Tensor:
    """``pooled [B, 1, P, P, P]`` (:func:`pooled_intensity`), ``points [B, N, 3]`` (crop voxels),
    ``labels [B, N]`` (1/0; others ignored) ``-> [B, 2 * len(scales), P/2, P/2, P/2]`` regions
    grown from the positive, then the negative clicks (see the module docstring). ``cache``
    (one per crop): regions grown in an earlier call are reused, new ones kept."""
    if pooled.ndim != 5 or pooled.shape[1] != 1 or pooled.shape[2] % 2:
        raise ValueError(f"pooled must be [B, 1, P, P, P] with P even, got {tuple(pooled.shape)}")
    b, p, n_s = pooled.shape[0], pooled.shape[2], len(scales)
    h = window // 2
    idx = click_index(points, p, img_size)
    inside = click_inside(points, img_size)
    jobs = [(i, j, int(labels[i, j])) for i in range(b) for j in range(points.shape[1])
            if bool(inside[i, j]) and int(labels[i, j]) in (0, 1)]
    out = torch.zeros(b, 2 * n_s, p // 2, p // 2, p // 2, dtype=torch.float32, device=pooled.device)
    if not jobs:
        return out
    # in padded coordinates (the crop with ``h`` cells of +inf before it) the window of a
    # click at cell c starts at c (its centre is c + h); on the crop, at c - h
    corners = [tuple(int(v) for v in idx[i, j]) for i, j, _ in jobs]
    keys = [(i, x, y, z, scales, steps, window) for (i, _, _), (x, y, z) in zip(jobs, corners)]
    cache = RegionCache() if cache is None else cache  # a throwaway one: each click grown once
    cache.bind(pooled)
    missing = list(dict.fromkeys(k for k in keys if cache.get(k) is None))
    if missing:
        padded = F.pad(pooled.float(), (h, window - h) * 3, value=float("inf"))  # affinity 0 outside the crop
        windows = torch.stack([padded[i, :, x:x + window, y:y + window, z:z + window] for i, x, y, z, *_ in missing])
        for k, r in zip(missing, grow(windows, scales, steps)):
            cache.put(k, r)
    # the part of each window on the crop (what lies beyond it is dropped), united per label on
    # the box of cells (even-aligned) that the windows cover: the rest stays 0 and pools to 0
    ons = [tuple(slice(max(c - h, 0), min(c - h + window, p)) for c in corner) for corner in corners]
    lo = [min(on[d].start for on in ons) // 2 * 2 for d in range(3)]
    hi = [-(-max(on[d].stop for on in ons) // 2) * 2 for d in range(3)]
    united = torch.zeros(b, 2 * n_s, *(y - x for x, y in zip(lo, hi)), dtype=torch.float32, device=pooled.device)
    for (i, _, label), corner, on, key in zip(jobs, corners, ons, keys):
        c0 = 0 if label == 1 else n_s
        r = cache.get(key)
        part = r[(slice(None),) + tuple(slice(s.start - (c - h), s.stop - (c - h)) for s, c in zip(on, corner))]
        view = united[(i, slice(c0, c0 + n_s)) + tuple(slice(s.start - x, s.stop - x) for s, x in zip(on, lo))]
        view.copy_(torch.maximum(view, part))
    out[(slice(None), slice(None)) + tuple(slice(x // 2, y // 2) for x, y in zip(lo, hi))] = F.avg_pool3d(united, 2)
    return out
