"""Click simulation.

Training (M-SAM / SAM-Med3D): the first click lies in the lesion; every next click is a voxel
drawn uniformly from the error region (false negatives union false positives) of the current
prediction, positive when it falls on a false negative, negative on a false positive.

Evaluation (deterministic, as a careful user would click): the first click at the lesion's
deepest voxel (largest distance to its border); every next click at the deepest voxel of the
largest connected error region, positive for a missed part, negative for a false positive.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from msam_core.pipeline.postprocess import bbox_slices


def random_error_clicks(pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per sample from the error region.

    Args:
        pred, gt: ``bool [B, 1, D, H, W]`` on any device (the random draws use ``generator``, a
            CPU generator, so a GPU run draws the same clicks as a CPU run).

    Returns:
        ``(points [B, 1, 3] float32 voxel indices, labels [B, 1] int64)``. A sample without any
        error gets a positive click on a random lesion voxel (or the crop centre when empty).
    """
    b = pred.shape[0]
    points = torch.empty(b, 1, 3)
    labels = torch.empty(b, 1, dtype=torch.long)
    shape = pred.shape[2:]
    for i in range(b):
        fn = gt[i, 0] & ~pred[i, 0]
        fp = pred[i, 0] & ~gt[i, 0]
        region = fn | fp
        if not bool(region.any()):
            region = gt[i, 0] if bool(gt[i, 0].any()) else None
        if region is None:
            points[i, 0] = torch.tensor([s // 2 for s in shape], dtype=torch.float32)
            labels[i, 0] = 1
            continue
        flat = torch.nonzero(region.reshape(-1)).squeeze(1)
        pick = int(flat[int(torch.randint(len(flat), (1,), generator=generator))])
        idx = np.unravel_index(pick, tuple(shape))
        points[i, 0] = torch.tensor(idx, dtype=torch.float32)
        labels[i, 0] = 1 if bool(gt[i, 0][idx]) else 0
    return points, labels


def border_depth(mask: np.ndarray, outside_is_background: bool = True) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Euclidean distance (voxels) of each voxel of a non-empty ``mask`` to the nearest voxel outside
    it, on the mask's bounding box grown by one voxel: ``(depth over the box, the box's slices)``.

    Equal to ``distance_transform_edt`` of the whole array, at a fraction of the cost for a small
    lesion in a large volume: every voxel outside the box is outside the mask, and for a voxel in
    the box the nearest of them lies on the box's one-voxel rim (clamping a point onto the box
    brings it closer). Where the box meets the array's edge it is the array's edge, which counts as
    outside the mask when ``outside_is_background`` (as if the array were padded with background)
    and not otherwise (scipy's own convention).
    """
    box = bbox_slices(mask, margin=1)
    sub = np.asarray(mask[box], bool)
    if outside_is_background:
        return ndimage.distance_transform_edt(np.pad(sub, 1))[(slice(1, -1),) * sub.ndim], box
    return ndimage.distance_transform_edt(sub), box


def deepest_voxel(mask: np.ndarray) -> np.ndarray | None:
    """Voxel index of the point of ``mask`` farthest from its border, the array's edge counting as
    border (``None`` when empty; ties: the first in C order)."""
    if not mask.any():
        return None
    depth, box = border_depth(mask)
    inner = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.asarray([b.start + i for b, i in zip(box, inner)])


def first_click(gt: np.ndarray) -> np.ndarray:
    """The evaluation's first click: the lesion's deepest voxel."""
    point = deepest_voxel(gt)
    if point is None:
        raise ValueError("empty lesion mask")
    return point


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The evaluation's next click: deepest voxel of the largest error component.

    Returns ``(voxel index, label)`` (1 = missed lesion, 0 = false positive), or ``None`` when
    the prediction is perfect.
    """
    best: tuple[int, np.ndarray, int] | None = None
    for region, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        comps, n = ndimage.label(region)
        if n == 0:
            continue
        sizes = np.bincount(comps.ravel())[1:]
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (int(sizes[k - 1]), comps == k, label)
    if best is None:
        return None
    point = deepest_voxel(best[1])
    assert point is not None
    return point, best[2]
