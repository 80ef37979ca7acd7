"""Thick-slice copies of thin-slice cases: the through-plane blur of clinical CT and MR.

The synthetic cases are written at 1.5 mm in every direction, but most clinical series are
stacks of 3-6 mm slices (the real tumours of ``msam data real`` have 2.1-6.5 mm), each slice
the mean signal of its slab. The pipeline resamples such a series linearly onto its 1.5 mm
crops, so a lesion there is blurred along the slice axis and its outline, drawn per slice, is a
stack of slabs. A thick copy of a case makes that happen to a synthetic one:

- image: the mean of each run of ``factor`` slices along the stored axis nearest to S (the axial
  slice axis), starting at slice ``phase``;
- labels: the label of each slab's middle slice (a rater drawing on the thick slice);
- affine: slab ``j`` centred on thin slice ``phase + j * factor + (factor - 1) / 2``.

``msam data synth`` writes a thick copy (factor :data:`FACTOR`, 4.5 mm) of every validation and
held-out case as the splits ``validation_thick`` and ``heldout_thick``.
"""

from __future__ import annotations

import numpy as np

#: Slices per slab of the thick copies ``msam data synth`` writes (4.5 mm at 1.5 mm).
FACTOR = 3


def slice_axis(affine: np.ndarray) -> int:
    """The stored axis whose direction is nearest to S (superior), the usual slice axis."""
    directions = np.asarray(affine, float)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions[2])))


def thick_copy(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, factor: int = FACTOR,
               axis: int | None = None, phase: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, labels, affine)`` of the case as slabs of ``factor`` slices along ``axis``
    (default :func:`slice_axis`); slices before ``phase`` and after the last whole slab are dropped.

    Raises:
        ValueError: ``factor < 2``, ``phase`` outside ``0..factor-1``, shapes that differ, or fewer
            than ``phase + factor`` slices.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    axis = slice_axis(affine) if axis is None else int(axis)
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must share a grid")
    if factor < 2 or not 0 <= phase < factor:
        raise ValueError(f"need factor >= 2 and 0 <= phase < factor, got factor {factor}, phase {phase}")
    n = (image.shape[axis] - phase) // factor
    if n < 1:
        raise ValueError(f"{image.shape[axis]} slices along axis {axis} hold no slab of {factor} from slice {phase}")
    moved = np.moveaxis(image, axis, -1)[..., phase:phase + n * factor].astype(np.float32)
    slabs = moved.reshape(*moved.shape[:-1], n, factor).mean(axis=-1)
    middle = np.moveaxis(labels, axis, -1)[..., phase + factor // 2:phase + n * factor:factor]
    out_affine = np.array(affine, dtype=np.float64, copy=True)
    out_affine[:3, 3] = out_affine[:3, :3] @ (np.eye(3)[axis] * (phase + (factor - 1) / 2)) + out_affine[:3, 3]
    out_affine[:3, axis] *= factor
    return (np.ascontiguousarray(np.moveaxis(slabs, -1, axis)), np.ascontiguousarray(np.moveaxis(middle, -1, axis)),
            out_affine)
