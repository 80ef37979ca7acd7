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

The 3 mm view is decoded from the clicks alone (no mask prompt): the 1.5 mm view's logits are the
ones fed back in an interactive session, whichever candidate is shown. It costs one more image
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
from scipy import ndimage

from msam_core.pipeline.postprocess import bbox_slices
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


def logits_to_fine(logits: np.ndarray, fine: CropGrid, coarse: CropGrid) -> np.ndarray:
    """Coarse crop logits ``float32 [S, S, S]`` -> logits on the fine crop (trilinear; the fine
    crop lies inside the coarse one)."""
    scale, offset = _mapping(fine, coarse)
    return ndimage.affine_transform(np.asarray(logits, np.float32), np.full(3, scale), offset=offset,
                                    output_shape=fine.shape, order=1, mode="nearest")


def contrast_to_noise(crop: np.ndarray, mask: np.ndarray, shell: int = SHELL_VOXELS) -> float:
    """How clearly ``mask`` stands out from the ``shell`` voxels around it in ``crop`` (``[a, b, c]``,
    or ``[1, 1, a, b, c]``): ``|mean in - mean shell| / sqrt((var in + var shell) / 2)``; ``-inf``
    for an empty mask or one without a shell (it fills the crop)."""
    crop = np.asarray(crop, np.float32).reshape(np.shape(mask))
    mask = np.asarray(mask, bool)
    box = bbox_slices(mask, margin=shell)
    if box is None:
        return float("-inf")
    inner = mask[box]
    ring = ndimage.binary_dilation(inner, ndimage.generate_binary_structure(3, 1), iterations=shell) & ~inner
    if not ring.any():
        return float("-inf")
    inside, around = crop[box][inner], crop[box][ring]
    spread = np.sqrt((float(inside.var()) + float(around.var())) / 2.0) + 1e-6
    return abs(float(inside.mean()) - float(around.mean())) / spread


def choose(crop: np.ndarray, candidates: dict[str, np.ndarray]) -> str:
    """The name of the candidate logits (``float32 [a, b, c]``, ``> 0`` = lesion) whose mask has the
    highest :func:`contrast_to_noise`; ties go to the first."""
    scores = {name: contrast_to_noise(crop, logits > 0) for name, logits in candidates.items()}
    return max(scores, key=lambda name: (scores[name], -list(candidates).index(name)))
