"""From network logits back to a label mask on the input's own grid.

Upstream: low-res logits ``[1, 1, 32, 32, 32]`` -> 128^3 trilinear (``align_corners=False``),
``sigmoid > 0.5`` (that is, logit > 0), then back to the original grid with nearest neighbour. We
carry *logits* to the input grid (nearest, so the thresholded result is identical to resampling
the binary mask) because several lesions are then told apart by the larger logit, and we resample
only the bounding box of the foreground, so the cost does not grow with the input's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from msam_core.io.volume import Volume

#: Logit used for "certainly background" (outside a box, outside every window).
BACKGROUND_LOGIT = -30.0


#: A box of crop voxels, ``(a, b, c)`` slices (empty slices: no voxel).
Box3 = tuple[slice, slice, slice]


def upsample_logits(low_res: torch.Tensor, size: int = 128, box: Box3 | None = None,
                    fill: float = BACKGROUND_LOGIT) -> np.ndarray:
    """``[1, 1, r, r, r]`` logits -> ``float32 [size, size, size]`` logits: trilinear,
    ``align_corners=False`` (``F.interpolate``'s sampling positions and edge clamping).

    When ``size`` is a power-of-two multiple of ``r`` (the network's 32 -> 128) the weights are
    a few dyadic pairs, one per output phase, so the upsampling is computed separably per phase in
    float64, where every product is exact, and rounded to float32 once: the exact trilinear value
    (``F.interpolate`` on the float64 logits, rounded, bit for bit), at a third of the cost of
    ``F.interpolate``'s float32 pass, whose own roundings leave it up to a few float32 steps off.
    Other sizes go through ``F.interpolate``.

    ``box``: only the voxels in it are computed (from the cells they use: the same values), the
    rest set to ``fill``; with :func:`upsample_reach`'s box the voxels left out are those whose
    value is ``<= 0`` anyway."""
    low = low_res.detach().float()
    r = low.shape[-1]
    factor = size // r if size % r == 0 else 0
    if low.shape[-3:] != (r, r, r) or factor < 1 or factor & (factor - 1):
        up = F.interpolate(low, size=(size, size, size), mode="trilinear", align_corners=False)[0, 0].cpu().numpy()
        return up if box is None else fill_outside(up, box, fill)
    if box is None:
        return upsample_block(low[0, 0].cpu().numpy(), factor)
    out = np.full((size,) * 3, fill, np.float32)
    lo, hi = box_bounds(box)
    if np.all(hi > lo):
        out[box] = upsample_part(low[0, 0].cpu().numpy(), factor, lo, hi)
    return out


def upsample_reach(low_res: torch.Tensor, size: int = 128) -> Box3 | None:
    """The box of :func:`upsample_logits`'s ``size^3`` voxels outside which every value is ``<= 0``;
    ``None`` when every value is.

    Each voxel ``i`` (per axis) is a weighted mean, with weights ``>= 0``, of the cells ``floor(s)``
    and ``floor(s) + 1`` at ``s = (i + 0.5) r / size - 0.5`` (clamped to the cells), so a cell
    ``k`` enters only the voxels with ``k - 1 <= s < k + 1``: beyond the box of the cells ``> 0``
    grown that way (and by one more voxel against rounding), every voxel is a mean of cells
    ``<= 0``."""
    low = low_res.detach()[0, 0].float().cpu().numpy()
    span = foreground_bbox(low > 0)
    if span is None:
        return None
    r = np.asarray(low.shape)
    scale = size / r
    lo = np.maximum(np.floor((span[0] - 0.5) * scale - 0.5).astype(int) - 1, 0)
    hi = np.minimum(np.ceil((span[1] + 1.5) * scale - 0.5).astype(int) + 1, size)
    return _box(lo, hi)


def fill_outside(values: np.ndarray, box: Box3, fill: float) -> np.ndarray:
    """``values`` with every voxel outside ``box`` set to ``fill`` (in place; returned)."""
    kept = values[box].copy()
    values.fill(fill)
    values[box] = kept
    return values


def box_bounds(box: Box3) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``: a box's first and one-past-last voxel per axis (``hi <= lo``: empty)."""
    return np.asarray([sl.start for sl in box]), np.asarray([sl.stop for sl in box])


def _box(lo, hi) -> Box3:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def union_box(boxes, shape: tuple[int, ...]) -> Box3:
    """The smallest box holding every box of ``boxes`` that is not ``None`` or empty, clipped to
    ``shape`` (an empty box when there is none)."""
    bounds = [box_bounds(b) for b in boxes if b is not None]
    bounds = [(lo, hi) for lo, hi in bounds if np.all(hi > lo)]
    if not bounds:
        return _box((0, 0, 0), (0, 0, 0))
    lo = np.maximum(np.min([b[0] for b in bounds], axis=0), 0)
    hi = np.minimum(np.max([b[1] for b in bounds], axis=0), shape)
    return _box(lo, hi)


def upsample_part(values: np.ndarray, factor: int, lo, hi) -> np.ndarray:
    """``upsample_block(values, factor)[lo:hi]`` (per axis), computed from the cells those voxels
    use only: voxel ``i`` lies between cells ``floor((i + 0.5) / factor - 0.5)`` and the next
    (clamped), so upsampling the cells from the first voxel's to the last one's next gives them
    with the same positions and weights: the same values (see :func:`upsample_block`)."""
    lo, hi = np.asarray(lo, int), np.asarray(hi, int)
    cells = np.asarray(values.shape)
    first = np.maximum(np.floor((lo + 0.5) / factor - 0.5).astype(int), 0)
    last = np.minimum(np.floor((hi - 1 + 0.5) / factor - 0.5).astype(int) + 1, cells - 1)
    block = values[tuple(slice(int(a), int(b) + 1) for a, b in zip(first, last))]
    start = lo - factor * first
    return upsample_block(block, factor)[tuple(slice(int(s), int(s + n)) for s, n in zip(start, hi - lo))]


def upsample_block(values: np.ndarray, factor: int) -> np.ndarray:
    """``[a, b, c]`` logits -> ``float32 [a f, b f, c f]`` (``f`` = ``factor``, a power of two):
    trilinear, ``align_corners=False``, edges clamped, computed in float64 and rounded once (see
    :func:`upsample_logits`). A block cut from a larger array gives, away from the block's own
    edges, the values of upsampling the whole array there (the same positions and weights)."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor must be a power of two, got {factor}")
    v = np.asarray(values, np.float64)
    v = _upsample_axis(v, 2, factor)
    v = _upsample_axis(v, 1, factor)
    out = np.empty((v.shape[0] * factor,) + v.shape[1:], np.float32)
    return _upsample_axis(v, 0, factor, out)


def _upsample_axis(values: np.ndarray, axis: int, factor: int, out: np.ndarray | None = None) -> np.ndarray:
    """Linear upsampling by ``factor`` along ``axis`` (``align_corners=False``): output ``k f + p``
    lies ``t = (p + 0.5) / f - 0.5`` cells from input ``k``, between it and the previous cell
    (``t < 0``) or the next, the neighbour clamped at the edges (where both weights then fall on
    the edge cell, whose value comes back exactly). Written into ``out`` (default float64)."""
    def along(part: slice) -> tuple[slice, ...]:
        return (slice(None),) * axis + (part,)

    n = values.shape[axis]
    shape = list(values.shape)
    shape[axis] = n * factor
    out = np.empty(shape, np.float64) if out is None else out
    before = np.concatenate([values[along(slice(0, 1))], values[along(slice(0, n - 1))]], axis=axis)
    after = np.concatenate([values[along(slice(1, n))], values[along(slice(n - 1, n))]], axis=axis)
    for p in range(factor):
        t = (p + 0.5) / factor - 0.5
        if t < 0:
            out[along(slice(p, None, factor))] = before * -t + values * (1 + t)
        else:
            out[along(slice(p, None, factor))] = values * (1 - t) + after * t
    return out


def foreground_bbox(mask: np.ndarray, within: Box3 | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive ``(lo, hi)`` voxel indices of the ``True`` voxels of a 3D mask, or ``None``.

    Two passes over the mask: its rows along the first axis, and its projection onto the other
    two, from which their spans are read. ``within``: a box that holds every ``True`` voxel; only
    it is read."""
    if within is not None:
        part = mask[within]
        found = foreground_bbox(part) if part.size else None
        if found is None:
            return None
        start = box_bounds(within)[0]
        return found[0] + start, found[1] + start
    mask = np.asarray(mask, bool)
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if rows.size == 0:
        return None
    plane = mask.any(axis=0)
    spans = [(rows[0], rows[-1])]
    for hits in (np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))):
        spans.append((hits[0], hits[-1]))
    lo, hi = zip(*spans)
    return np.asarray(lo), np.asarray(hi)


def bbox_slices(mask: np.ndarray, margin: int = 0, within: Box3 | None = None) -> tuple[slice, ...] | None:
    """Slices of the :func:`foreground_bbox` of ``mask`` grown by ``margin`` voxels on every side
    and clipped to the array, or ``None`` for an empty mask (``within``: see
    :func:`foreground_bbox`)."""
    box = foreground_bbox(mask, within)
    if box is None:
        return None
    lo = np.maximum(box[0] - margin, 0)
    hi = np.minimum(box[1] + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def positive_mask(logits: np.ndarray, within: Box3 | None = None) -> np.ndarray:
    """``logits > 0``; with ``within``, a box that holds every logit ``> 0``, computed there only
    (the rest of the array is ``False`` without being read)."""
    if within is None:
        return logits > 0
    mask = np.zeros(logits.shape, bool)
    np.greater(logits[within], 0, out=mask[within])
    return mask


@dataclass
class GridLogits:
    """Logits of one lesion on the input grid, restricted to a box of it.

    Attributes:
        lo: ``(3,)`` input voxel index of ``logits[0, 0, 0]``.
        logits: ``float32 [I', J', K']`` logits for input voxels ``lo .. lo + shape - 1``.
    """

    lo: np.ndarray
    logits: np.ndarray

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(int(l), int(l) + n) for l, n in zip(self.lo, self.logits.shape))  # type: ignore[return-value]


def logits_to_volume_grid(logits: np.ndarray, logits_affine: np.ndarray,
                          volume: Volume) -> GridLogits | None:
    """Resample (nearest) a lesion's logits onto the input grid, cropped to the image.

    Args:
        logits: ``float32 [A, B, C]`` logits on a RAS-aligned crop/canvas grid.
        logits_affine: ``(4, 4)`` canvas voxel index -> RAS mm.
        volume: the input image (target grid).

    Returns:
        the logits over the input voxels the foreground can reach, or ``None`` when empty.
    """
    box = foreground_bbox(logits > 0)
    if box is None:
        return None
    lo_c, hi_c = box
    corners_canvas = np.array([[x, y, z] for x in (lo_c[0] - 1, hi_c[0] + 1)
                               for y in (lo_c[1] - 1, hi_c[1] + 1)
                               for z in (lo_c[2] - 1, hi_c[2] + 1)], dtype=np.float64)
    to_voxel = np.linalg.inv(volume.affine) @ logits_affine
    corners = corners_canvas @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    shape = np.asarray(volume.shape)
    lo = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, shape - 1)
    hi = np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, shape - 1)
    sub_shape = tuple(int(n) for n in hi - lo + 1)
    shift = np.eye(4)
    shift[:3, 3] = lo
    from msam_core.pipeline.resample import IndexImage  # here: training imports the box helpers without SimpleITK

    dst_to_src = np.linalg.inv(logits_affine) @ volume.affine @ shift
    sub = IndexImage(logits.astype(np.float32, copy=False)).resample(
        dst_to_src, sub_shape, "nearest", BACKGROUND_LOGIT)  # type: ignore[arg-type]
    if not np.any(sub > 0):
        return None
    return GridLogits(lo=lo, logits=sub)


def clip_to_box(grid_logits: GridLogits | None, box, volume: Volume) -> GridLogits | None:
    """Set the logits of input voxels whose centre lies outside ``box`` (a
    :class:`~msam_core.pipeline.prompts.ResolvedBox`) to background, on the input grid itself, so
    the clipping is exact whatever the crop resolution."""
    if grid_logits is None:
        return None
    idx = np.indices(grid_logits.logits.shape).reshape(3, -1).T + grid_logits.lo
    inside = box.contains_ras(volume.voxel_to_ras(idx), volume).reshape(grid_logits.logits.shape)
    grid_logits.logits[~inside] = BACKGROUND_LOGIT
    return grid_logits if np.any(grid_logits.logits > 0) else None


def combine_lesions(per_lesion: dict[int, GridLogits | None], shape: tuple[int, int, int]) -> np.ndarray:
    """Label mask ``uint8`` of ``shape``: voxel = lesion whose logit is > 0 and largest there."""
    labels = np.zeros(shape, dtype=np.uint8)
    best: dict[int, GridLogits] = {}
    for lesion, grid_logits in sorted(per_lesion.items()):
        if grid_logits is None:
            continue
        sl = grid_logits.slices
        fg = grid_logits.logits > 0
        region = labels[sl]
        taken = region != 0
        if np.any(taken & fg):
            # compare with the logit of the lesion already there
            current = np.full(fg.shape, -np.inf, dtype=np.float32)
            for other, other_logits in best.items():
                where = region == other
                if not np.any(where):
                    continue
                overlap = _window(other_logits, grid_logits)
                current[where] = overlap[where]
            fg &= grid_logits.logits > current
        region[fg] = lesion
        best[lesion] = grid_logits
    return labels


def _window(src: GridLogits, dst: GridLogits) -> np.ndarray:
    """``src``'s logits over ``dst``'s box (``-inf`` where ``src`` has none)."""
    out = np.full(dst.logits.shape, -np.inf, dtype=np.float32)
    lo = np.maximum(src.lo, dst.lo)
    hi = np.minimum(src.lo + src.logits.shape, dst.lo + dst.logits.shape)
    if np.any(hi <= lo):
        return out
    s = tuple(slice(int(a - b), int(c - b)) for a, b, c in zip(lo, src.lo, hi))
    d = tuple(slice(int(a - b), int(c - b)) for a, b, c in zip(lo, dst.lo, hi))
    out[d] = src.logits[s]
    return out
