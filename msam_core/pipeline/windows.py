"""Lesions larger than one crop: more 128^3 windows, 50 % overlap, following the mask.

SAM-Med3D's paper (section 4.3) segments large targets with overlapping windows; upstream's code
does not. Here all windows of one lesion lie on one lattice: window ``(p, q, r)`` is the first
crop shifted by ``(64p, 64q, 64r)`` crop voxels (96 mm steps at 1.5 mm). After each prediction,
every face of the window that the mask touches *and* behind which the image continues opens the
neighbour window on that side, until no face is touched or ``max_windows`` is reached.

Logits of overlapping windows are merged as a weighted mean; each window's weight falls linearly
to a small floor over its outer 16 voxels, so a window's edge (where it sees least context) gives
way to its neighbour's centre. Because the lattice has 64-voxel steps, the merged logits are
kept as 64^3 blocks: window ``(p, q, r)`` covers blocks ``(p..p+1, q..q+1, r..r+1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from msam_core.pipeline.postprocess import BACKGROUND_LOGIT, Box3, bbox_slices, box_bounds, positive_mask
from msam_core.pipeline.preprocess import CROP_SIZE, CropGrid

STEP = CROP_SIZE // 2
RAMP = 16
WEIGHT_FLOOR = 1e-3
Offset = tuple[int, int, int]
FACES: tuple[tuple[int, int], ...] = tuple((axis, side) for axis in range(3) for side in (-1, 1))


def _ramp_1d(size: int = CROP_SIZE, ramp: int = RAMP) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) + 0.5
    return np.clip(np.minimum(x, size - x) / ramp, WEIGHT_FLOOR, 1.0)


_W1 = _ramp_1d()
WINDOW_WEIGHT = (_W1[:, None, None] * _W1[None, :, None] * _W1[None, None, :]).astype(np.float32)


def window_grid(base: CropGrid, offset: Offset) -> CropGrid:
    """The crop grid of window ``offset`` (in half-window steps) around ``base``."""
    return base.shifted(tuple(STEP * int(o) for o in offset))  # type: ignore[arg-type]


@dataclass
class LogitCanvas:
    """Weighted sum of window logits on the lattice of one lesion, stored as 64^3 blocks."""

    base: CropGrid
    _sum: dict[Offset, np.ndarray] = field(default_factory=dict)
    _weight: dict[Offset, np.ndarray] = field(default_factory=dict)
    _alone: tuple[Offset, np.ndarray, Box3 | None] | None = None

    def add(self, offset: Offset, logits: np.ndarray, alone: bool = False, within: Box3 | None = None) -> None:
        """Add the ``float32 [128, 128, 128]`` logits of window ``offset`` (a block no window
        covered yet starts as this window's weighted logits and weights).

        ``alone``: the lesion's only window, of which only the mask and the logits ``> 0`` count
        (:meth:`Segmenter.finish <msam_core.pipeline.segmenter.Segmenter.finish>` computes no
        more): it is kept as it is and weighted by :meth:`merged` over its positive voxels only.
        No window may be added beside it. ``within``: a box that holds its logits ``> 0`` (only it
        is searched for them)."""
        if self._alone is not None or (alone and self._sum):
            raise ValueError("a window added alone cannot be merged with another")
        if alone:
            self._alone = (offset, logits, within)
            return
        for d, block, sl in _blocks(offset):
            weighted = np.multiply(logits[sl], WINDOW_WEIGHT[sl], dtype=np.float32)
            if block not in self._sum:
                self._sum[block], self._weight[block] = weighted, WINDOW_WEIGHT[sl].copy()
            else:
                self._sum[block] += weighted
                self._weight[block] += WINDOW_WEIGHT[sl]

    def window(self, offset: Offset) -> tuple[np.ndarray, np.ndarray]:
        """Merged logits over window ``offset`` and a ``bool`` map of where any are known."""
        if self._alone is not None:
            raise ValueError("a window added alone has no neighbours to seed")
        logits = np.full((CROP_SIZE,) * 3, BACKGROUND_LOGIT, np.float32)
        known = np.zeros((CROP_SIZE,) * 3, bool)
        for d, block, sl in _blocks(offset):
            if block in self._sum:
                logits[sl] = self._sum[block] / self._weight[block]
                known[sl] = True
        return logits, known

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """All merged logits ``float32 [A, B, C]`` and their affine (canvas voxel -> RAS mm);
        voxels no window covered are :data:`BACKGROUND_LOGIT`. For a window added alone, the
        box of its voxels ``> 0`` grown by one voxel (the values the weighted mean gives there;
        ``[1, 1, 1]`` of background when none is)."""
        if self._alone is not None:
            return self._merged_alone(*self._alone)
        blocks = np.array(list(self._sum), dtype=int).reshape(-1, 3)
        lo, hi = blocks.min(axis=0), blocks.max(axis=0)
        shape = tuple(int(n) for n in (hi - lo + 1) * STEP)
        if len(self._sum) == int(np.prod(hi - lo + 1)):  # the blocks fill the box: no background to set
            out = np.empty(shape, np.float32)
        else:
            out = np.full(shape, BACKGROUND_LOGIT, np.float32)
        for block in self._sum:
            start = (np.asarray(block) - lo) * STEP
            sl = tuple(slice(int(s), int(s) + STEP) for s in start)
            np.divide(self._sum[block], self._weight[block], out=out[sl])
        return out, window_grid(self.base, tuple(int(v) for v in lo)).affine  # type: ignore[arg-type]

    def _merged_alone(self, offset: Offset, logits: np.ndarray, within: Box3 | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`merged` of the window added alone: the weighted mean over its positive voxels'
        box, the same operations as over the blocks."""
        box = bbox_slices(positive_mask(logits, within), margin=1, within=within)
        if box is None:
            out, lo = np.full((1, 1, 1), BACKGROUND_LOGIT, np.float32), np.zeros(3, int)
        else:
            lo = box_bounds(box)[0]
            weight = WINDOW_WEIGHT[box]
            out = np.divide(np.multiply(logits[box], weight, dtype=np.float32), weight)
        affine = window_grid(self.base, offset).affine.copy()
        affine[:3, 3] += affine[:3, :3] @ lo
        return out, affine


def _blocks(offset: Offset):
    """``(delta, block, window slice)`` for the eight 64^3 blocks of window ``offset``."""
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                d = (dx, dy, dz)
                block = (offset[0] + dx, offset[1] + dy, offset[2] + dz)
                sl = tuple(slice(v * STEP, (v + 1) * STEP) for v in d)
                yield d, block, sl


def _face_voxels(axis: int, side: int, outward: int) -> np.ndarray:
    """``(128*128, 3)`` crop indices of a window face, moved ``outward`` voxels beyond it."""
    u, v = np.meshgrid(np.arange(CROP_SIZE), np.arange(CROP_SIZE), indexing="ij")
    w = np.full(u.shape, (CROP_SIZE - 1 + outward) if side > 0 else -outward)
    cols = [u.ravel(), v.ravel()]
    cols.insert(axis, w.ravel())
    return np.stack(cols, axis=1).astype(np.float64)


#: crop indices just outside each face, in the order of ``np.take(mask, face, axis).ravel()``
_BEYOND_FACE: dict[tuple[int, int], np.ndarray] = {
    (axis, side): _face_voxels(axis, side, 1) for axis, side in FACES
}


def touched_faces(mask: np.ndarray, image_beyond) -> list[tuple[int, int]]:
    """Faces ``(axis, side)`` of a window whose mask reaches them with image behind them.

    Args:
        mask: ``bool [128, 128, 128]`` prediction of the window.
        image_beyond: callable ``(N, 3) crop indices -> (N,) bool`` (inside the input image).
    """
    faces = []
    for axis, side in FACES:
        index = CROP_SIZE - 1 if side > 0 else 0
        face = np.take(mask, index, axis=axis).ravel()
        if not face.any():
            continue
        if np.any(face & image_beyond(_BEYOND_FACE[(axis, side)])):
            faces.append((axis, side))
    return faces


def neighbour(offset: Offset, axis: int, side: int) -> Offset:
    moved = list(offset)
    moved[axis] += side
    return (moved[0], moved[1], moved[2])


def seed_from_known(logits: np.ndarray, known: np.ndarray) -> np.ndarray | None:
    """A positive click (``(3,)`` crop index) deep inside the already-segmented part of a new
    window, or ``None`` if that part has no foreground. Works on 4^3 blocks to stay cheap."""
    fg = (logits > 0) & known
    if not fg.any():
        return None
    coarse = fg.reshape(32, 4, 32, 4, 32, 4).mean(axis=(1, 3, 5)) >= 0.5
    if not coarse.any():
        idx = np.argwhere(fg)
        return idx[len(idx) // 2].astype(np.float64)
    dist = ndimage.distance_transform_edt(np.pad(coarse, 1))[1:-1, 1:-1, 1:-1]
    best = np.asarray(np.unravel_index(int(np.argmax(dist)), dist.shape), dtype=np.float64)
    return best * 4 + 1.5
