"""Intensity regions grown from the clicks: a fixed (parameter-free) prompt cue for the decoder.

A single click says *where* the lesion is but not *how far* it extends. A network trained from
scratch on a CPU budget learns a blob of typical size around the click; classical region
growing (SimpleITK ``ConfidenceConnected``) instead follows the intensities and gets the extent
of a clear lesion right from one click, but leaks where the contrast is weak. This module gives
the decoder that classical cue as input channels and lets it learn when to trust them - the
approach of DeepIGeoS (Wang et al., TPAMI 2018) and MIDeepSeg (Luo et al., MedIA 2021), whose
networks take geodesic distance maps of the clicks.

On the decoder's output grid (stride 4, ``G = 32``, 6 mm cells at 1.5 mm):

1. ``I``: the (input-transformed) crop, average-pooled over 4^3 voxels (less noise, one value per
   output cell).
2. Affinity of every cell to each click ``j``: ``a_j(x) = exp(-(I(x) - I(c_j))^2 / (2 s^2))`` for
   a few intensity scales ``s`` (:data:`SCALES`, in the units of the transformed, normalised
   crop; lesion-to-organ contrasts there are about 0.1-1). Per label (positive, negative) the
   affinity is the largest over that label's clicks.
3. Region: ``r = 1`` at the clicked cells, then :data:`STEPS` times
   ``r <- max(r, maxpool3x3x3(r) * a)``: ``r(x)`` is the best product of affinities along any
   path from a click to ``x`` - an exponentiated geodesic distance (max-product path), so a
   region does not jump to a disconnected structure of the same intensity.

``[B, 1, G, G, G]`` pooled crop + clicks ``-> [B, 2 * len(SCALES), G, G, G]`` in ``[0, 1]``:
positives' regions first, then negatives'. A label without a click inside the crop gives zeros.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: Intensity scales ``s`` of the affinity (transformed, normalised crop units).
SCALES: tuple[float, ...] = (0.1, 0.2, 0.4)
#: Propagation steps (cells of 6 mm): a region reaches at most ~100 mm from its click.
STEPS = 16
#: Side of the voxel block pooled into one cell (the decoder's logits are at stride 4).
POOL = 4


def click_cells(points: torch.Tensor, grid: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``points [B, N, 3]`` (crop voxels) -> the flat index of each click's cell on a ``grid^3``
    grid ``[B, N]`` (clamped into it) and whether the click lies inside the crop ``[B, N]``."""
    idx = (points.float() * grid / img_size).floor().long().clamp(0, grid - 1)
    flat = idx[..., 0] * grid * grid + idx[..., 1] * grid + idx[..., 2]
    inside = ((points >= 0) & (points < img_size)).all(-1)
    return flat, inside


def pooled_intensity(image: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S, S] -> [B, 1, S/4, S/4, S/4]``: mean intensity per output cell."""
    return F.avg_pool3d(image.float(), POOL)


def _dilate(r: torch.Tensor) -> torch.Tensor:
    """3x3x3 maximum filter of ``[B, C, X, Y, Z]`` (edges: the values inside), as three separable
    1D maxima of shifted views (several times faster than ``max_pool3d`` on a CPU)."""
    out = r
    for dim in (2, 3, 4):
        n = out.shape[dim]
        m = out.clone()
        lo, hi = out.narrow(dim, 0, n - 1), out.narrow(dim, 1, n - 1)
        m.narrow(dim, 1, n - 1).copy_(torch.maximum(m.narrow(dim, 1, n - 1), lo))
        m.narrow(dim, 0, n - 1).copy_(torch.maximum(m.narrow(dim, 0, n - 1), hi))
        out = m
    return out


@torch.no_grad()
def click_regions(pooled: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, img_size: int,
                  scales: tuple[float, ...] = SCALES, steps: int = STEPS) -> torch.Tensor:
    """``pooled [B, 1, G, G, G]``, ``points [B, N, 3]`` (crop voxels), ``labels [B, N]`` (1/0;
    others ignored) ``-> [B, 2 * len(scales), G, G, G]`` regions grown from the positive, then
    the negative clicks (see the module docstring)."""
    if pooled.ndim != 5 or pooled.shape[1] != 1:
        raise ValueError(f"pooled must be [B, 1, G, G, G], got {tuple(pooled.shape)}")
    b, g = pooled.shape[0], pooled.shape[2]
    inten = pooled.float().reshape(b, 1, -1)  # [B, 1, G^3]
    flat, inside = click_cells(points, g, img_size)  # [B, N] each
    at = torch.gather(inten[:, 0], 1, flat)  # [B, N]: intensity at each click
    sigma = torch.tensor(scales, dtype=inten.dtype, device=inten.device)  # [S]
    # affinity of every cell to every click at every scale: [B, N, S, G^3]
    diff = (inten[:, :, None, :] - at[:, :, None, None]) / sigma[None, None, :, None]
    aff = torch.exp(-0.5 * diff.square())
    out = []
    for value in (1, 0):
        use = (labels == value) & inside  # [B, N]
        a = (aff * use[:, :, None, None].to(aff.dtype)).amax(dim=1)  # [B, S, G^3]
        seeds = torch.zeros(b, g**3, dtype=aff.dtype, device=aff.device)
        seeds.scatter_add_(1, flat, use.to(aff.dtype))  # two clicks in one cell: add, then clamp
        seeds = seeds.clamp(max=1).reshape(b, 1, g, g, g).expand(-1, len(scales), -1, -1, -1)
        a = a.reshape(b, len(scales), g, g, g)
        r = seeds.clone()
        for _ in range(steps):
            r = torch.maximum(r, _dilate(r) * a)
        out.append(r)
    return torch.cat(out, dim=1)
