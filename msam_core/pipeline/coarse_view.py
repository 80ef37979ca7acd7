"""A second look at twice the spacing, for lesions larger than the network's usual blob.

A network trained on a small budget tends to draw a blob of roughly fixed size *in voxels* around a
first click, so on a large lesion its 1.5 mm view finds only part of it. On a crop of the same
place at 3 mm the same network sees the lesion at half the size and, for large lesions, draws more
of it; for small lesions the 3 mm view draws far too much. Neither view is right for every lesion,
and nothing tells the lesion's size before it is segmented. (What each view scores:
docs/experiments.md, "Coarse view".)

So the pipeline makes two candidates and keeps the one the image supports better:

- ``fine``: the 1.5 mm network logits (the pipeline without this module);
- ``both``: the mean of those and the 3 mm view's logits resampled onto the 1.5 mm crop;

each finished by the checkpoint's stable-region prior and boundary refinement. The candidate
whose mask stands out more clearly from its surroundings wins: the contrast-to-noise ratio
``|mean(inside) - mean(shell)| / sqrt((var(inside) + var(shell)) / 2)`` over the mask and the
shell of :data:`SHELL_VOXELS` voxels around it, on the crop the network sees (ties: ``fine``). A
mask that stops inside a lesion has lesion on both sides of its border; one that spills into the
organ mixes organ into its inside. Both lower the ratio.

The 3 mm view is decoded from the clicks alone (no mask prompt): where the previous click's logits
prompt the next (``msam evaluate``'s default protocol), the 1.5 mm view's are the ones fed back,
whichever candidate is shown. It costs one more image
embedding per window (cached like the first) and one more decoder pass per click. A checkpoint
turns it on with ``PipelineOptions.coarse_view`` (set by ``msam calibrate --coarse-view``); off by
default.

Grids: both crops are centred on the same RAS point, axes along +R, +A, +S; crop voxel indices
``(a, b, c)``. Fine index ``i`` lies at coarse index ``offset + i * scale`` (per axis), with
``scale = fine.spacing / coarse.spacing`` and ``offset = (fine.origin - coarse.origin) /
coarse.spacing``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from msam_core.pipeline.postprocess import (BACKGROUND_LOGIT, Box3, bbox_slices, box_bounds, fill_outside,
                                            positive_mask, upsample_logits, upsample_part, upsample_reach)
from msam_core.pipeline.preprocess import CropGrid

#: Spacing of the coarse view relative to the crop's own.
FACTOR = 2.0
#: Thickness (voxels) of the shell around a mask that its contrast is measured against.
SHELL_VOXELS = 3


def coarse_grid(grid: CropGrid, factor: float = FACTOR) -> CropGrid:
    """The grid of the same size and centre as ``grid`` at ``factor`` times its spacing."""
    centre = grid.crop_to_ras(np.full((1, 3), grid.size // 2, dtype=np.float64))[0]
    return CropGrid.centred(centre, size=grid.size, spacing=grid.spacing * factor)


def _mapping(fine: CropGrid, coarse: CropGrid) -> tuple[float, np.ndarray]:
    scale = fine.spacing / coarse.spacing
    offset = (np.asarray(fine.origin_ras) - np.asarray(coarse.origin_ras)) / coarse.spacing
    return scale, offset


def points_to_coarse(points_crop: np.ndarray, fine: CropGrid, coarse: CropGrid) -> np.ndarray:
    """``(N, 3)`` fine crop voxel indices -> ``(N, 3)`` coarse crop voxel indices (same RAS points)."""
    scale, offset = _mapping(fine, coarse)
    return offset + np.asarray(points_crop, dtype=np.float64).reshape(-1, 3) * scale


#: How far (coarse voxels) a grid offset may lie from a whole number and still be taken as one:
#: :func:`coarse_grid` puts the fine crop at a whole offset, up to rounding of the grids' origins.
WHOLE_OFFSET_TOLERANCE = 1e-6


def logits_to_fine(logits: np.ndarray, fine: CropGrid, coarse: CropGrid) -> np.ndarray:
    """Coarse crop logits ``float32 [S, S, S]`` -> logits on the fine crop (trilinear; the fine
    crop lies inside the coarse one).

    The grids of :func:`coarse_grid` (:data:`FACTOR` 2) put fine voxel ``i`` at coarse index
    ``offset + i / 2`` with a whole ``offset``: every other fine voxel is a coarse one and the rest
    are means of two (per axis). That is computed separably, in float64, on the part of the coarse
    crop the fine one covers, and rounded to float32 once: the exact trilinear value, as SciPy's
    ``affine_transform`` (order 1) computes it, bit for bit, at a whole offset, at a tenth of its
    cost. Other grids go through ``affine_transform``.
    """
    logits = np.asarray(logits, np.float32)
    lo = _whole_offset(fine, coarse, logits.shape)
    if lo is None:
        scale, offset = _mapping(fine, coarse)
        return ndimage.affine_transform(logits, np.full(3, scale), offset=offset,
                                        output_shape=fine.shape, order=1, mode="nearest")
    return _on_fine(logits, lo, np.full(3, fine.size // 2))


def low_res_to_fine(low_res: torch.Tensor, fine: CropGrid, coarse: CropGrid, box: Box3 | None = None,
                    fill: float = BACKGROUND_LOGIT) -> np.ndarray:
    """The coarse view's network logits ``[1, 1, r, r, r]`` -> logits on the fine crop: the same
    array as :func:`~msam_core.pipeline.postprocess.upsample_logits` to the coarse crop's size
    followed by :func:`logits_to_fine`, with only the part of the coarse crop the fine one covers
    upsampled (trilinear upsampling of a block of cells gives, away from the block's own edges,
    the values of upsampling them all: the same source positions and weights).

    ``box``: only the fine voxels in it are computed (the same values), the rest set to ``fill``;
    with :func:`fine_reach`'s box the voxels left out are those whose value is ``<= 0`` anyway."""
    r, size = low_res.shape[-1], coarse.size
    lo = _whole_offset(fine, coarse, coarse.shape)
    factor, n = size // r, fine.size // 2
    if lo is None or size % r or factor & (factor - 1) or low_res.shape[-3:] != (r, r, r):
        out = logits_to_fine(upsample_logits(low_res, size=size), fine, coarse)
        return out if box is None else fill_outside(out, box, fill)
    values = low_res.detach().float()[0, 0].cpu().numpy()
    if box is None:
        return _on_fine(upsample_part(values, factor, lo, lo + n + 1), np.zeros(3, int), np.full(3, n))
    out = np.full(fine.shape, fill, np.float32)
    a, b = box_bounds(box)
    if np.any(b <= a):
        return out
    # whole pairs of fine voxels: fine voxels 2j and 2j + 1 come from coarse voxels lo + j and the next
    pairs = a // 2, (b + 1) // 2
    part = _on_fine(upsample_part(values, factor, lo + pairs[0], lo + pairs[1] + 1), np.zeros(3, int),
                    pairs[1] - pairs[0])
    out[box] = part[tuple(slice(int(x - 2 * p), int(y - 2 * p)) for x, y, p in zip(a, b, pairs[0]))]
    return out


def fine_reach(low_res: torch.Tensor, fine: CropGrid, coarse: CropGrid) -> Box3 | None:
    """The box of :func:`low_res_to_fine`'s fine voxels outside which every value is ``<= 0``;
    ``None`` when every value is.

    Coarse voxels beyond :func:`~msam_core.pipeline.postprocess.upsample_reach`'s box are ``<= 0``
    and a fine voxel ``x`` is coarse voxel ``lo + x / 2`` or the mean of the two around it (a
    :func:`coarse_grid` view), so it reaches fine voxels ``2 (j - lo) - 1 .. 2 (j - lo) + 1`` of a
    coarse voxel ``j``. On other grids (trilinear resampling, means of coarse voxels again) the
    whole crop."""
    reach = upsample_reach(low_res, coarse.size)
    if reach is None:
        return None
    lo = _whole_offset(fine, coarse, coarse.shape)
    if lo is None:
        return tuple(slice(0, n) for n in fine.shape)  # type: ignore[return-value]
    first, stop = box_bounds(reach)
    a = np.maximum(2 * (first - lo) - 1, 0)
    b = np.minimum(2 * (stop - 1 - lo) + 2, fine.shape)
    return tuple(slice(int(x), int(max(x, y))) for x, y in zip(a, b))  # type: ignore[return-value]


def _whole_offset(fine: CropGrid, coarse: CropGrid, shape: tuple[int, ...]) -> np.ndarray | None:
    """The whole coarse index of fine voxel 0 when ``fine`` is a :func:`coarse_grid` view of
    ``coarse`` (scale 1/2, offset a whole number up to :data:`WHOLE_OFFSET_TOLERANCE`, the fine
    crop inside ``shape``), else ``None``."""
    scale, offset = _mapping(fine, coarse)
    whole = np.round(offset)
    n = fine.size // 2
    if (scale != 0.5 or fine.size % 2 or np.any(np.abs(offset - whole) > WHOLE_OFFSET_TOLERANCE)
            or np.any(whole < 0) or np.any(whole + n >= np.asarray(shape))):
        return None
    return whole.astype(int)


def _on_fine(values: np.ndarray, start: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Coarse logits ``values`` -> ``2 m`` fine voxels per axis (``m`` = ``pairs``, per axis), from
    the ``m + 1`` coarse voxels per axis from index ``start`` (float64 throughout, one rounding to
    float32)."""
    part = values[tuple(slice(int(a), int(a) + int(m) + 1) for a, m in zip(start, pairs))].astype(np.float64)
    part = _halves(part, 0)
    part = _halves(part, 1)
    return _halves(part, 2, np.empty(tuple(2 * int(m) for m in pairs), np.float32))


def _halves(values: np.ndarray, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """``n + 1`` samples along ``axis`` -> ``2 n``: each sample, then the mean of it and the next
    (computed in float64, written into ``out``, default a new float64 array)."""
    def along(part: slice) -> tuple[slice, ...]:
        return (slice(None),) * axis + (part,)

    n = values.shape[axis] - 1
    if out is None:
        shape = list(values.shape)
        shape[axis] = 2 * n
        out = np.empty(shape, np.float64)
    first, second = values[along(slice(0, n))], values[along(slice(1, n + 1))]
    out[along(slice(0, None, 2))] = first
    out[along(slice(1, None, 2))] = (first + second) * 0.5
    return out


def contrast_to_noise(crop: np.ndarray, mask: np.ndarray, shell: int = SHELL_VOXELS,
                      within: Box3 | None = None) -> float:
    """How clearly ``mask`` stands out from the ``shell`` voxels around it in ``crop`` (``[a, b, c]``,
    or ``[1, 1, a, b, c]``): ``|mean in - mean shell| / sqrt((var in + var shell) / 2)``; ``-inf``
    for an empty mask or one without a shell (it fills the crop). ``within``: a box that holds the
    whole mask (only it is searched for the mask's box)."""
    crop = np.asarray(crop, np.float32).reshape(np.shape(mask))
    mask = np.asarray(mask, bool)
    box = bbox_slices(mask, margin=shell, within=within)
    if box is None:
        return float("-inf")
    inner = mask[box]
    ring = ndimage.binary_dilation(inner, ndimage.generate_binary_structure(3, 1), iterations=shell) & ~inner
    if not ring.any():
        return float("-inf")
    inside, around = crop[box][inner], crop[box][ring]
    spread = np.sqrt((float(inside.var()) + float(around.var())) / 2.0) + 1e-6
    return abs(float(inside.mean()) - float(around.mean())) / spread


def choose(crop: np.ndarray, candidates: dict[str, np.ndarray], within: Box3 | None = None) -> str:
    """The name of the candidate logits (``float32 [a, b, c]``, ``> 0`` = lesion) whose mask has the
    highest :func:`contrast_to_noise`; ties go to the first. ``within``: a box that holds every
    candidate's logits ``> 0`` (only it is read)."""
    scores = {name: contrast_to_noise(crop, positive_mask(logits, within), within=within)
              for name, logits in candidates.items()}
    return max(scores, key=lambda name: (scores[name], -list(candidates).index(name)))
