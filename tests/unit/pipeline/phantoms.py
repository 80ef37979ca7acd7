"""Test helpers: analytic sphere phantoms on arbitrary grids, and a stand-in for the network.

Everything is generated from a *physical* description (centre and radius in RAS mm), evaluated at
the world position of each voxel centre, so the same object can be stored on any grid.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

INSIDE = 150.0
OUTSIDE = 50.0


def make_affine(spacing=(1.0, 1.0, 1.0), rotation=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """voxel -> RAS affine from spacing, a 3x3 rotation (columns = axis directions) and origin."""
    affine = np.eye(4)
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def rotation(axis, degrees: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis /= np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def centred_affine(shape, spacing, rot, center_ras) -> np.ndarray:
    """An affine whose grid of ``shape`` has its middle voxel at ``center_ras``."""
    affine = make_affine(spacing, rot)
    mid = (np.asarray(shape) - 1) / 2
    affine[:3, 3] = np.asarray(center_ras) - affine[:3, :3] @ mid
    return affine


def voxel_centres_ras(shape, affine) -> np.ndarray:
    """``shape + (3,)`` RAS mm of every voxel centre."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


def spheres_image(shape, affine, spheres, edge_mm: float = 1.0) -> np.ndarray:
    """``float32`` image: OUTSIDE, rising to INSIDE within each ``(center_ras, radius)`` sphere,
    with a linear edge ``edge_mm`` wide (limits aliasing so grids can be compared)."""
    world = voxel_centres_ras(shape, affine)
    frac = np.zeros(shape, np.float32)
    for center, radius in spheres:
        d = np.linalg.norm(world - np.asarray(center), axis=-1)
        frac = np.maximum(frac, np.clip((radius - d) / edge_mm + 0.5, 0.0, 1.0))
    return (OUTSIDE + (INSIDE - OUTSIDE) * frac).astype(np.float32)


def sphere_truth(shape, affine, center, radius) -> np.ndarray:
    """``bool`` mask of the voxels whose centre lies inside the sphere."""
    world = voxel_centres_ras(shape, affine)
    return np.linalg.norm(world - np.asarray(center), axis=-1) <= radius


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


def sample_mask_at(mask: np.ndarray, affine: np.ndarray, points_ras: np.ndarray) -> np.ndarray:
    """Nearest-voxel lookup of ``mask`` at ``points_ras`` ``(..., 3)``; False outside."""
    pts = np.asarray(points_ras).reshape(-1, 3)
    inv = np.linalg.inv(affine)
    vox = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    ok = np.all((vox >= 0) & (vox < np.asarray(mask.shape)), axis=1)
    out = np.zeros(len(pts), bool)
    out[ok] = mask[tuple(vox[ok].T)] > 0
    return out.reshape(np.asarray(points_ras).shape[:-1])


class RegionGrowDouble:
    """Stands in for the network in geometry tests (deterministic, classical, no weights).

    It satisfies the model interface the pipeline uses, so the pipeline's geometry (crop
    placement, axis order of clicks, resampling back to the input grid, window following) can be
    checked *exactly*, which a random-weight network cannot do:

    * ``encode`` is a lossless space-to-depth of the crop: ``[B, 1, 128^3] -> [B, 4096, 8, 8, 8]``.
    * ``decode`` thresholds the crop halfway between the value at the first positive click and
      the crop's minimum, keeps the connected components that hold a positive click and no
      negative click, and returns logits ``12 * (2 f - 1)`` on 32^3, where ``f`` is the fraction
      of each 4^3 block inside. ``mask_logits`` are ignored; ``refine`` is ``decode``.
    """

    img_size = 128
    model_id = "region-grow-double-v1"

    def __init__(self) -> None:
        self.encode_calls = 0
        self.decode_calls = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        b = image.shape[0]
        x = image.reshape(b, 8, 16, 8, 16, 8, 16).permute(0, 2, 4, 6, 1, 3, 5)
        return x.reshape(b, 4096, 8, 8, 8).clone()

    @staticmethod
    def _image(embedding: torch.Tensor) -> np.ndarray:
        x = embedding.reshape(1, 16, 16, 16, 8, 8, 8).permute(0, 4, 1, 5, 2, 6, 3)
        return x.reshape(128, 128, 128).cpu().numpy()

    def decode(self, embedding, points, labels, mask_logits=None, cache=None) -> torch.Tensor:
        self.decode_calls += 1
        img = self._image(embedding)
        pts = points[0].cpu().numpy()
        lab = labels[0].cpu().numpy()
        vox = np.clip(np.rint(pts).astype(int), 0, 127)
        first = vox[int(np.argmax(lab == 1))]
        threshold = (img[tuple(first)] + img.min()) / 2
        components, _ = ndimage.label(img > threshold)
        keep = {components[tuple(v)] for v, l in zip(vox, lab) if l == 1} - {0}
        keep -= {components[tuple(v)] for v, l in zip(vox, lab) if l == 0}
        mask = np.isin(components, list(keep)) if keep else np.zeros(img.shape, bool)
        frac = F.avg_pool3d(torch.from_numpy(mask.astype(np.float32))[None, None], 4)
        return 12.0 * (2.0 * frac - 1.0)

    def refine(self, embedding, points, labels, mask_logits=None, iterations=1) -> torch.Tensor:
        return self.decode(embedding, points, labels, mask_logits)
