"""Full-resolution boundary refinement: a random walker in a band around the mask.

The network decides on 6 mm cells (32^3 logits for a 128^3 crop at 1.5 mm), so its boundary is
a smooth blob that cannot follow an edge between two of its cells, and a negative click on a
false positive a few millimetres wide, or a positive click on a thin missed rim, is felt
only through a whole cell. The stable-region prior (:mod:`~msam_core.pipeline.region_prior`)
follows intensities, but only where a positive click grows a region.

The random walker (Grady, PAMI 2006; scikit-image's ``random_walker``) labels each undecided
voxel by the probability that a random walk from it, stepping preferably between voxels of
similar intensity (``beta``), reaches an inside seed before an outside one. Here the mask
(logits ``> 0``) decides the seeds:

- inside: the mask's voxels deeper than ``band`` (or than half the mask's greatest depth, when
  that is less: a walker from one seed voxel, all a small mask eroded by the band would leave,
  shrinks the mask to that voxel), and the positive clicks;
- outside: everything farther than ``band`` voxels from the mask, and the negative clicks;
- undecided: the band of ``band`` voxels on both sides of the mask's surface, where the walker
  puts the boundary on the nearest intensity edge, at full resolution.

The logits of the band become the logit of the walker's probability of "inside"; seeds keep the
network's logits, and each click's own voxel is forced to its label. ``band = 0`` leaves the
logits unchanged. The bands are calibrated per checkpoint on validation lesions
(``msam calibrate --boundary-bands``; ``PipelineOptions.boundary_band_first`` for a lesion prompted
by one positive click, ``boundary_band`` after further clicks).

Crops are the pipeline's 128^3 crops as numpy ``[a, b, c]`` arrays (the normalised crop the
model sees before its input transform); clicks are continuous crop voxel indices ``(a, b, c)``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage


#: The walker's edge sensitivity (scikit-image's default; it scales it by the crop's spread).
BETA = 130.0
#: Convergence tolerance of the walker's conjugate-gradient solve.
TOLERANCE = 1e-3
#: Largest magnitude of a band logit (probabilities 1e-4 .. 1 - 1e-4).
MAX_LOGIT = float(np.log((1 - 1e-4) / 1e-4))
#: Logit a click's own voxel is at least pushed to (towards its label).
CLICK_LOGIT = 1.0


def _click_voxels(points: np.ndarray, labels: np.ndarray, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], int]]:
    """``[(voxel index, label)]`` of the clicks whose rounded voxel lies inside ``shape``."""
    points = np.asarray(points, float).reshape(-1, 3)
    out = []
    for p, lab in zip(np.round(points).astype(int), np.asarray(labels).reshape(-1)):
        if np.all(p >= 0) and np.all(p < np.asarray(shape)):
            out.append((tuple(int(v) for v in p), int(lab)))
    return out


def mask_depth(mask: np.ndarray) -> np.ndarray:
    """``ndimage.distance_transform_edt(mask)``, computed on the mask's bounding box grown by one
    voxel (clipped to the array) instead of the whole crop: the same values, since every voxel
    beyond that box is at least as far from the mask as the ring of background around it."""
    depth = np.zeros(mask.shape, np.float64)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return depth
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    depth[box] = ndimage.distance_transform_edt(mask[box])
    return depth


def seeds(mask: np.ndarray, points: np.ndarray, labels: np.ndarray, band: int) -> np.ndarray:
    """``int32`` seed map for the walker: 1 inside, 2 outside, 0 undecided (see the module).
    Depths are Euclidean distances (voxels) to the nearest voxel outside the mask."""
    if band < 1:
        raise ValueError(f"band must be >= 1 voxel, got {band}")
    out = np.zeros(mask.shape, np.int32)
    out[~ndimage.binary_dilation(mask, iterations=band)] = 2
    depth = mask_depth(mask)
    out[depth > min(band, depth.max() / 2)] = 1
    for voxel, label in _click_voxels(points, labels, mask.shape):
        out[voxel] = 1 if label == 1 else 2
    return out


def refine_boundary(crop: np.ndarray, logits: np.ndarray, points: np.ndarray, labels: np.ndarray,
                    band: int, beta: float = BETA) -> np.ndarray:
    """Crop logits with the mask's boundary moved onto the image's edges (see the module).

    Args:
        crop: ``[a, b, c]`` (or ``[1, 1, a, b, c]``) normalised crop.
        logits: ``float32 [a, b, c]`` crop logits (``> 0`` = lesion).
        points: ``(N, 3)`` clicks in crop voxels; labels ``(N,)`` 1 positive / 0 negative.
        band: half-width (voxels) of the undecided band; 0 returns ``logits`` unchanged.

    Returns:
        ``float32 [a, b, c]`` logits (a new array unless unchanged).
    """
    from skimage.segmentation import random_walker

    if band == 0:
        return logits
    image = np.asarray(crop, np.float64)
    image = image.reshape(image.shape[-3:])
    if image.shape != logits.shape:
        raise ValueError(f"crop {image.shape} and logits {logits.shape} must share the crop grid")
    mask = logits > 0
    if not mask.any():
        return logits
    seed = seeds(mask, points, labels, band)
    reach = np.argwhere(seed != 2)
    lo = np.maximum(reach.min(0) - 1, 0)
    hi = np.minimum(reach.max(0) + 2, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = seed[box]
    undecided = sub == 0
    if not undecided.any() or not (sub == 1).any() or not (sub == 2).any():
        return logits  # nothing to decide, or one side has no seed in reach (a mask filling the crop)
    if not np.ptp(image[box]) > 0:
        return logits  # a uniform crop has no edge to move to (the walker's weights divide by its spread)
    with warnings.catch_warnings():
        # scikit-image warns that plain "cg" is slow without UMFPACK (fast enough on a band; "cg_j"
        # is no faster) and that probabilities overshoot [0, 1] within the tolerance (clipped below)
        warnings.simplefilter("ignore", UserWarning)
        prob = random_walker(image[box], sub, beta=beta, mode="cg", tol=TOLERANCE, return_full_prob=True)[0]
    p = np.clip(prob[undecided], 1e-4, 1 - 1e-4)
    out = logits.astype(np.float32, copy=True)
    region = out[box]
    region[undecided] = np.clip(np.log(p / (1 - p)), -MAX_LOGIT, MAX_LOGIT)
    for voxel, label in _click_voxels(points, labels, mask.shape):
        out[voxel] = max(out[voxel], CLICK_LOGIT) if label == 1 else min(out[voxel], -CLICK_LOGIT)
    return out
