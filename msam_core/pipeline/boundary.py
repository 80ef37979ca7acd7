"""Full-resolution boundary refinement: a random walker in a band around the mask.

The network decides on 6 mm cells (32^3 logits for a 128^3 crop at 1.5 mm), so its boundary is
a smooth blob that cannot follow an edge between two of its cells, and a negative click on a
false positive a few millimetres wide, or a positive click on a thin missed rim, is felt
only through a whole cell. The stable-region prior (:mod:`~msam_core.pipeline.region_prior`)
follows intensities, but only where a positive click grows a region.

The random walker (Grady, PAMI 2006) labels each undecided voxel by the probability that a
random walk from it, stepping preferably between voxels of similar intensity (``beta``), reaches
an inside seed before an outside one. Here the mask (logits ``> 0``) decides the seeds:

- inside: the mask's voxels deeper than ``band`` (or than half the mask's greatest depth, when
  that is less: a walker from one seed voxel, all a small mask eroded by the band would leave,
  shrinks the mask to that voxel), and the positive clicks;
- outside: everything farther than ``band`` voxels from the mask, and the negative clicks;
- undecided: the band of ``band`` voxels on both sides of the mask's surface, where the walker
  puts the boundary on the nearest intensity edge, at full resolution.

The walk (:func:`walk_probability`) is scikit-image's ``random_walker`` in ``"cg"`` mode for
two labels: the same edge weights and linear system (:func:`walk_system`), solved by conjugate
gradients from zero to the same tolerance. It is cheaper in two ways: the graph holds only the
edges that touch an undecided voxel (the only ones in the system solved), and one system is
solved instead of one per label (the probability of "outside" is one minus that of "inside").
Its sums run in another order, so the iterative solve's result differs from scikit-image's by
rounding carried through the iterations, well within what the tolerance allows.

The logits of the band become the logit of the walker's probability of "inside"; seeds keep the
network's logits, and each click's own voxel is forced to its label. ``band = 0`` leaves the
logits unchanged. The bands are calibrated per checkpoint on validation lesions
(``msam calibrate --boundary-bands``; ``PipelineOptions.boundary_band_first`` for a lesion prompted
by one positive click, ``boundary_band`` after further clicks).

Crops are the pipeline's 128^3 crops as numpy ``[a, b, c]`` arrays (the normalised crop the
model sees before its input transform); clicks are continuous crop voxel indices ``(a, b, c)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg

from msam_core.pipeline.postprocess import Box3, bbox_slices, box_bounds, positive_mask, union_box

#: The walker's edge sensitivity (scikit-image's default; it is scaled by the walked box's spread).
BETA = 130.0
#: Convergence tolerance of the walker's conjugate-gradient solve (relative residual).
TOLERANCE = 1e-3
#: Added to every edge weight (scikit-image's), so that no edge is cut entirely.
WEIGHT_EPS = 1e-10
#: Largest magnitude of a band logit (probabilities 1e-4 .. 1 - 1e-4).
MAX_LOGIT = float(np.log((1 - 1e-4) / 1e-4))
#: Logit a click's own voxel is at least pushed to (towards its label).
CLICK_LOGIT = 1.0


def _click_voxels(points: np.ndarray, labels: np.ndarray, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], int]]:
    """``[(voxel index, label)]`` of the clicks whose rounded voxel lies inside ``shape``."""
    voxels = np.round(np.asarray(points, float).reshape(-1, 3)).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)), axis=1)
    return [(tuple(v), lab) for v, lab in zip(voxels[inside].tolist(), np.asarray(labels).reshape(-1)[inside].tolist())]


def _box_depth(mask: np.ndarray, within: Box3 | None = None) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """``(box, depth)``: the mask's bounding box grown by one voxel (clipped to the array) and
    ``ndimage.distance_transform_edt`` of the mask on it; ``None`` for an empty mask (``within``:
    a box that holds the whole mask)."""
    box = bbox_slices(mask, margin=1, within=within)
    if box is None:
        return None
    return box, ndimage.distance_transform_edt(mask[box])


def mask_depth(mask: np.ndarray) -> np.ndarray:
    """``ndimage.distance_transform_edt(mask)``, computed on the mask's bounding box grown by one
    voxel (clipped to the array) instead of the whole crop: the same values, since every voxel
    beyond that box is at least as far from the mask as the ring of background around it."""
    depth = np.zeros(mask.shape, np.float64)
    found = _box_depth(mask)
    if found is not None:
        depth[found[0]] = found[1]
    return depth


def _seeds(mask: np.ndarray, points: np.ndarray, labels: np.ndarray, band: int,
           within: Box3 | None = None) -> tuple[np.ndarray | None, tuple[slice, ...] | None]:
    """``(sub, box)``: the :func:`seeds` map on ``box``, the bounding box of its voxels other
    than 2 grown by one voxel (clipped to the array); ``(None, None)`` when every voxel is 2.
    Beyond ``box`` every voxel is 2.

    Only the mask's bounding box grown by ``band`` is computed: ``band`` dilations by the
    6-neighbourhood reach no farther from the mask than ``band`` voxels along each axis, and a
    voxel's path to the mask stays inside the box around both (the array's own edges clip the
    box as they clip the dilation), so the dilation on that box equals the whole crop's there and
    every voxel beyond it is outside (2). Depths are 0 beyond the one-voxel ring (see
    :func:`mask_depth`), so no inside seed lies beyond it either; only positive clicks are.
    ``within``: a box that holds the whole mask (only it is searched for the mask's box)."""
    if band < 1:
        raise ValueError(f"band must be >= 1 voxel, got {band}")
    final: dict[tuple[int, ...], int] = {}
    for voxel, label in _click_voxels(points, labels, mask.shape):
        final[voxel] = 1 if label == 1 else 2  # a voxel clicked twice takes its last click's label
    near = bbox_slices(mask, margin=band, within=within)
    core = None
    reach: list[np.ndarray] = []
    if near is not None:
        core = np.full(tuple(sl.stop - sl.start for sl in near), 2, np.int32)
        core[ndimage.binary_dilation(mask[near], iterations=band)] = 0
        box, depth = _box_depth(mask, within)  # type: ignore[misc]
        core[tuple(slice(b.start - n.start, b.stop - n.start) for b, n in zip(box, near))][
            depth > min(band, depth.max() / 2)] = 1
        start = np.asarray([sl.start for sl in near])
        for voxel, value in list(final.items()):
            if all(sl.start <= v < sl.stop for v, sl in zip(voxel, near)):
                core[tuple(np.asarray(voxel) - start)] = value
                del final[voxel]
        sub = np.argwhere(core != 2)
        if sub.size:
            reach += [sub.min(0) + start, sub.max(0) + start]
    extra = [voxel for voxel, value in final.items() if value == 1]  # positive clicks beyond ``near``
    reach += [np.asarray(voxel) for voxel in extra]
    if not reach:
        return None, None
    points_in = np.asarray(reach)
    lo = np.maximum(points_in.min(0) - 1, 0)
    hi = np.minimum(points_in.max(0) + 2, mask.shape)
    out = np.full(tuple(int(b - a) for a, b in zip(lo, hi)), 2, np.int32)
    if core is not None:
        # the part of ``near`` inside the box (its voxels other than 2 all are)
        a = np.maximum(lo, [sl.start for sl in near])
        b = np.minimum(hi, [sl.stop for sl in near])
        if np.all(b > a):
            out[tuple(slice(int(x - l), int(y - l)) for x, y, l in zip(a, b, lo))] = \
                core[tuple(slice(int(x - sl.start), int(y - sl.start)) for x, y, sl in zip(a, b, near))]
    for voxel in extra:
        out[tuple(np.asarray(voxel) - lo)] = 1
    return out, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def seeds(mask: np.ndarray, points: np.ndarray, labels: np.ndarray, band: int) -> np.ndarray:
    """``int32`` seed map for the walker: 1 inside, 2 outside, 0 undecided (see the module).
    Depths are Euclidean distances (voxels) to the nearest voxel outside the mask."""
    sub, box = _seeds(mask, points, labels, band)
    out = np.full(mask.shape, 2, np.int32)
    if box is not None:
        out[box] = sub
    return out


def walk_reach(box: Box3, points: np.ndarray, labels: np.ndarray, band: int, shape: tuple[int, ...]) -> Box3:
    """A box that holds every logit ``> 0`` of :func:`refine_boundary`'s result when ``box`` holds
    every one of its input's: the walk decides only voxels within ``band`` of the mask and makes
    the positive clicks' voxels positive."""
    if band < 1:
        return box
    lo, hi = box_bounds(box)
    grown = None if np.any(hi <= lo) else tuple(slice(int(a) - band, int(b) + band) for a, b in zip(lo, hi))
    clicks = [tuple(slice(v, v + 1) for v in voxel) for voxel, label in _click_voxels(points, labels, shape)
              if label == 1]
    return union_box([grown, *clicks], shape)


def walk_system(image: np.ndarray, seeds: np.ndarray, beta: float = BETA) -> tuple[sparse.csr_array, np.ndarray]:
    """Grady's linear system for the probability of reaching an inside seed first:
    ``L x = r``, with ``L`` the graph Laplacian's rows and columns of the undecided voxels (in C
    order) and ``r`` each one's summed edge weight to inside seeds.

    Args:
        image: ``float64 [a, b, c]`` intensities.
        seeds: ``int [a, b, c]``: 1 inside, 2 outside, 0 undecided.
        beta: edge sensitivity; the edge between 6-neighbours of intensities ``u`` and ``v``
            weighs ``exp(-beta (u - v)^2 / (10 std(image))) + WEIGHT_EPS``.

    Returns:
        ``(L, r)``: ``L`` ``(n, n)`` and ``r`` ``(n,)`` for the ``n`` undecided voxels.
    """
    undecided = seeds == 0
    n = int(np.count_nonzero(undecided))
    index = np.full(seeds.shape, -1, np.int64)
    index[undecided] = np.arange(n)
    scale = -beta / (10 * image.std())
    diagonal = np.zeros(n)
    rhs = np.zeros(n)
    rows, cols, weights = [], [], []
    for axis in range(3):
        head = tuple(slice(None, -1) if k == axis else slice(None) for k in range(3))
        tail = tuple(slice(1, None) if k == axis else slice(None) for k in range(3))
        i, j = index[head], index[tail]
        edge = (i >= 0) | (j >= 0)  # an edge between two seeds is not in the system
        i, j = i[edge], j[edge]
        w = np.exp(scale * (image[tail][edge] - image[head][edge]) ** 2) + WEIGHT_EPS
        si, sj = seeds[head][edge], seeds[tail][edge]
        for end, other in ((i, sj), (j, si)):  # each end of the edge, and the seed at the other end
            mine = end >= 0
            diagonal += np.bincount(end[mine], w[mine], minlength=n)
            to_inside = mine & (other == 1)
            rhs += np.bincount(end[to_inside], w[to_inside], minlength=n)
        both = (i >= 0) & (j >= 0)
        rows += [i[both], j[both]]
        cols += [j[both], i[both]]
        weights += [-w[both], -w[both]]
    every = np.arange(n)
    laplacian = sparse.csr_array((np.concatenate(weights + [diagonal]),
                                  (np.concatenate(rows + [every]), np.concatenate(cols + [every]))), shape=(n, n))
    return laplacian, rhs


def walk_probability(image: np.ndarray, seeds: np.ndarray, beta: float = BETA, tol: float = TOLERANCE) -> np.ndarray:
    """The probability that a random walk from each undecided voxel reaches an inside seed first:
    :func:`walk_system` solved by conjugate gradients from zero, without preconditioner, to the
    relative residual ``tol``.

    Returns:
        ``float64`` like ``seeds``: the probabilities on the undecided voxels, 0 on the seeds.
    """
    undecided = seeds == 0
    out = np.zeros(seeds.shape, np.float64)
    if undecided.any():
        laplacian, rhs = walk_system(image, seeds, beta)
        out[undecided], _ = cg(laplacian, rhs, rtol=tol, atol=0)
    return out


def refine_boundary(crop: np.ndarray, logits: np.ndarray, points: np.ndarray, labels: np.ndarray,
                    band: int, beta: float = BETA, overwrite: bool = False, within: Box3 | None = None) -> np.ndarray:
    """Crop logits with the mask's boundary moved onto the image's edges (see the module).

    Args:
        crop: ``[a, b, c]`` (or ``[1, 1, a, b, c]``) normalised crop.
        logits: ``float32 [a, b, c]`` crop logits (``> 0`` = lesion).
        points: ``(N, 3)`` clicks in crop voxels; labels ``(N,)`` 1 positive / 0 negative.
        band: half-width (voxels) of the undecided band; 0 returns ``logits`` unchanged.
        overwrite: write the refined logits into ``logits`` (a float32 array the caller owns and
            does not need as it was) instead of a copy of it.
        within: a box of the crop that holds every logit ``> 0``; only it is read for the mask
            (the same result as reading the whole crop).

    Returns:
        ``float32 [a, b, c]`` logits (a new array unless unchanged or ``overwrite``).
    """
    if band == 0:
        return logits
    crop = np.asarray(crop)
    crop = crop.reshape(crop.shape[-3:])
    if crop.shape != logits.shape:
        raise ValueError(f"crop {crop.shape} and logits {logits.shape} must share the crop grid")
    mask = positive_mask(logits, within)
    if not mask[within if within is not None else ...].any():
        return logits
    sub, box = _seeds(mask, points, labels, band, within)
    if box is None:
        return logits
    undecided = sub == 0
    if not undecided.any() or not (sub == 1).any() or not (sub == 2).any():
        return logits  # nothing to decide, or one side has no seed in reach (a mask filling the crop)
    image = crop[box].astype(np.float64)
    if not np.ptp(image) > 0:
        return logits  # a uniform box has no edge to move to (the weights divide by its spread)
    # probabilities overshoot [0, 1] within the solve's tolerance: clipped
    p = np.clip(walk_probability(image, sub, beta, TOLERANCE)[undecided], 1e-4, 1 - 1e-4)
    out = logits if overwrite and logits.dtype == np.float32 else logits.astype(np.float32, copy=True)
    region = out[box]
    region[undecided] = np.clip(np.log(p / (1 - p)), -MAX_LOGIT, MAX_LOGIT)
    for voxel, label in _click_voxels(points, labels, mask.shape):
        out[voxel] = max(out[voxel], CLICK_LOGIT) if label == 1 else min(out[voxel], -CLICK_LOGIT)
    return out
