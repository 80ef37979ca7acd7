"""A full-resolution prior from the clicks: the most stable region grown from each positive click.

The network decides on a 32^3 grid (6 mm cells at 1.5 mm) and, trained on a small budget, tends to
draw a blob of typical size around a first click whatever the lesion's extent. Classical
region growing follows the intensities at full resolution and gets a clearly bounded lesion right
from one click, but which tolerance fits differs from lesion to lesion, and a wrong one leaks
into the organ or stops at noise. The *stable* region picks it without ground truth, as maximally
stable extremal regions (Matas et al., BMVC 2002) do for thresholds: SimpleITK
``ConfidenceConnected`` grows from the click at increasing multipliers (:data:`MULTIPLIERS`); a
region bounded by a real edge barely changes from one multiplier to the next, while a leak jumps.
Of the consecutive pairs whose regions lie within :data:`MIN_VOXELS`..:data:`MAX_VOXELS`, the one
with the highest overlap (IoU) gives the region (the larger of the two). No pair within the
bounds (a uniform crop, a click on noise, a lesion larger than the bound): no prior.

Growing stops at the first region above the bound: no pair may end at it, and a leak floods the
whole 128^3 crop at every larger multiplier, which costs seconds each (``bench/pipeline.py`` times
the worst case). ConfidenceConnected's iterations are not monotone - a region that floods at one
iteration can shrink back at the next, so a larger multiplier may give a region within the bound
again; the stop gives up those (their effect, measured: docs/experiments.md, "Stable-region
prior").

The pipeline adds ``weight * (2 r - 1)`` to the upsampled crop logits (``r`` the union of the
positive clicks' regions, 1 inside): where the network is unsure, the region decides; where it is
sure (a negative click nearby), the network does. The weights are calibrated per checkpoint on
validation lesions (``msam calibrate --prior-weights``; ``PipelineOptions.prior_weight_first`` for a
lesion prompted by one positive click, ``prior_weight`` after further clicks); 0 turns it off.

Crops are the pipeline's 128^3 crops on a RAS-aligned isotropic lattice, as numpy ``[a, b, c]``
arrays; clicks are continuous crop voxel indices ``(a, b, c)``. SimpleITK indexes ``(c, b, a)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from msam_core.pipeline.postprocess import Box3

#: ConfidenceConnected multipliers tried, in increasing order (the interval is mean +- m std).
MULTIPLIERS: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
#: Smallest region (voxels) a stable pair may start from: fewer is noise around the click.
MIN_VOXELS = 8
#: Largest region (voxels, 67.5 ml at 1.5 mm: a 50 mm sphere) a stable pair may end at, by default
#: (``PipelineOptions.prior_max_voxels`` holds the bound a checkpoint's weights were calibrated at).
#: Chosen on synthetic training lesions, which reach 60 mm (the prior has no trained parameter, so
#: training lesions are fair ground for it); how: docs/experiments.md, "Stable-region prior".
MAX_VOXELS = 20000
#: Gaussian smoothing (voxels) before growing, as the region-growing baseline of ``msam evaluate``.
SIGMA = 0.5
#: ConfidenceConnected's iterations and initial neighbourhood radius (voxels).
ITERATIONS = 4
RADIUS = 1


def _seed(click: Sequence[float], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Crop voxel ``(a, b, c)`` -> SimpleITK index ``(c, b, a)``, rounded and clamped into the crop."""
    idx = np.clip(np.round(np.asarray(click, float)), 0, np.asarray(shape) - 1).astype(int)
    return int(idx[2]), int(idx[1]), int(idx[0])


def grown_regions(image, click: Sequence[float], multipliers: Sequence[float] = MULTIPLIERS,
                  max_voxels: int | None = None) -> list[np.ndarray]:
    """ConfidenceConnected regions (bool ``[a, b, c]``) from ``click``, one per multiplier, in order.

    ``image``: a SimpleITK image of the (smoothed) crop, as :class:`RegionPrior` makes it. With
    ``max_voxels``, growing stops at the first region above it, which is left out (no stable pair
    may end at it), so fewer regions than multipliers may come back.
    """
    import SimpleITK as sitk

    seed = _seed(click, image.GetSize()[::-1])
    regions = []
    for m in multipliers:
        region = sitk.GetArrayFromImage(sitk.ConfidenceConnected(
            image, seedList=[seed], numberOfIterations=ITERATIONS, multiplier=float(m),
            initialNeighborhoodRadius=RADIUS, replaceValue=1)).view(bool)  # 0/1 bytes: no copy
        if max_voxels is not None and np.count_nonzero(region) > max_voxels:
            break
        regions.append(region)
    return regions


def most_stable(regions: Sequence[np.ndarray], min_voxels: int = MIN_VOXELS,
                max_voxels: int = MAX_VOXELS) -> np.ndarray | None:
    """Of consecutive ``regions`` (growing tolerance), the larger of the pair with the highest IoU
    among pairs from at least ``min_voxels`` to at most ``max_voxels``; ``None`` if no pair fits.
    Ties go to the smaller tolerance."""
    best: tuple[float, np.ndarray] | None = None
    sizes = [np.count_nonzero(r) for r in regions]
    for (a, na), (b, nb) in zip(zip(regions, sizes), zip(regions[1:], sizes[1:])):
        if na < min_voxels or nb > max_voxels:
            continue
        inter = np.count_nonzero(np.logical_and(a, b))
        iou = inter / (na + nb - inter)  # the union's count, without a pass over it
        if best is None or iou > best[0]:
            best = (iou, b)
    return None if best is None else best[1]


class RegionPrior:
    """The stable regions of one crop's clicks, each grown once (keep one per crop and interaction).

    Args:
        crop: the normalised crop, ``[a, b, c]`` (or ``[1, 1, a, b, c]``), as the model sees it
            before its input transform.
        max_voxels: the largest stable region taken (``PipelineOptions.prior_max_voxels``).
    """

    def __init__(self, crop, max_voxels: int = MAX_VOXELS) -> None:
        import SimpleITK as sitk

        array = np.asarray(crop, np.float32)
        array = array.reshape(array.shape[-3:])
        if array.ndim != 3 or min(array.shape) < 2:
            raise ValueError(f"RegionPrior needs a 3D crop, got shape {np.shape(crop)}")
        self.shape = array.shape
        self.max_voxels = int(max_voxels)
        image = sitk.GetImageFromArray(array)
        self._image = sitk.SmoothingRecursiveGaussian(image, SIGMA) if SIGMA > 0 else image
        self._regions: dict[tuple[int, int, int], np.ndarray | None] = {}

    def region(self, click: Sequence[float]) -> np.ndarray | None:
        """The stable region of one click (cached by its voxel), or ``None``."""
        key = _seed(click, self.shape)
        if key not in self._regions:
            regions = grown_regions(self._image, click, max_voxels=self.max_voxels)
            self._regions[key] = most_stable(regions, max_voxels=self.max_voxels)
        return self._regions[key]

    def mask(self, points: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """Union of the stable regions of the positive clicks inside the crop (``points [N, 3]``
        crop voxels, ``labels [N]``), or ``None`` when none has one."""
        points = np.asarray(points, float).reshape(-1, 3)
        inside = np.all((points >= 0) & (points <= np.asarray(self.shape) - 1), axis=1)
        union = None
        for p in points[(np.asarray(labels).reshape(-1) == 1) & inside]:
            r = self.region(p)
            if r is not None:
                union = r.copy() if union is None else (union | r)
        return union


def add_prior(logits: np.ndarray, prior: np.ndarray | None, weight: float, box: Box3 | None = None,
              overwrite: bool = False) -> np.ndarray:
    """``logits + weight * (2 prior - 1)`` (``float32 [a, b, c]``); ``logits`` unchanged when there
    is no prior or the weight is 0.

    ``box``: only its voxels are changed (the prior within it; the rest left as they are);
    ``overwrite``: written into ``logits`` (float32, the caller's to change) instead of a new
    array."""
    if prior is None or weight == 0:
        return logits
    if prior.shape != logits.shape:
        raise ValueError(f"prior {prior.shape} and logits {logits.shape} must share the crop grid")
    # weight * (2 prior - 1) is +weight or -weight exactly, so adding it is one addition per voxel
    w = np.float32(weight)
    inside = np.asarray(prior, bool)
    if overwrite and logits.dtype == np.float32:
        out = logits
    elif box is None:
        out = np.empty(logits.shape, np.float32)
    else:
        out = np.array(logits, np.float32)
    box = box if box is not None else (slice(None),) * 3
    source, target, where = logits[box], out[box], inside[box]
    # each voxel read and written by one of the two (so ``out`` may be ``logits``)
    np.subtract(source, w, dtype=np.float32, out=target, where=~where)
    np.add(source, w, dtype=np.float32, out=target, where=where)
    return out


def one_positive_click(labels: np.ndarray) -> bool:
    """Whether a lesion's clicks are one positive click (the first of an interaction), which gets
    its own calibrated settings."""
    labels = np.asarray(labels).reshape(-1)
    return labels.size == 1 and int(labels[0]) == 1
