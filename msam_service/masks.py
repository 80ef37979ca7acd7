"""Lesion masks as prompts: a request's lesion may carry ``"mask": {"volume_id": ID, "label": K}``,
a stored volume (uploaded with ``POST /volumes``, or with the request in the multipart field
``masks``) whose voxels of label ``K`` (or all that are not 0) mark the lesion. The worker hands
them to the pipeline as the lesion's previous-mask prompt. A mask must lie on the image's own
grid: a mask on another grid would be read at the wrong voxels (a mirrored or shifted prompt),
so it is refused with what differs (:func:`grid_difference`), never resampled silently.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from msam_core.errors import InvalidPrompt
from msam_core.io.volume import Volume
from msam_service.contract import MaskDocument, PromptDocument, numbered_lesions

#: Corners of two grids further apart than this (mm) are different grids.
GRID_TOLERANCE_MM = 1e-2


def _axis_words(affine: np.ndarray) -> list[str]:
    """Where each voxel axis points, e.g. ``["+R", "-A", "+S"]`` (the closest world axis)."""
    words = []
    for column in np.asarray(affine, dtype=np.float64)[:3, :3].T:
        n = int(np.argmax(np.abs(column)))
        words.append(("+" if column[n] > 0 else "-") + "RAS"[n])
    return words


def grid_difference(mask_shape: tuple[int, ...] | list[int], mask_affine: np.ndarray,
                    image_shape: tuple[int, ...] | list[int], image_affine: np.ndarray) -> str | None:
    """``None`` when a mask's grid is the image's (same shape, and every corner voxel within
    :data:`GRID_TOLERANCE_MM`); else what differs, in words a user can act on (shape, voxel
    size, axis directions - a mirrored axis is named - and position)."""
    mask_affine, image_affine = np.asarray(mask_affine, np.float64), np.asarray(image_affine, np.float64)
    if list(mask_shape) != list(image_shape):
        return f"its shape is {list(mask_shape)}, the image's {list(image_shape)}"
    corners = np.array([[i, j, k, 1.0] for i in (0, mask_shape[0] - 1) for j in (0, mask_shape[1] - 1)
                        for k in (0, mask_shape[2] - 1)])
    apart = float(np.max(np.abs(corners @ mask_affine.T - corners @ image_affine.T)))
    if apart <= GRID_TOLERANCE_MM:
        return None
    parts = []
    spacing_m = np.linalg.norm(mask_affine[:3, :3], axis=0)
    spacing_i = np.linalg.norm(image_affine[:3, :3], axis=0)
    if not np.allclose(spacing_m, spacing_i, atol=1e-4):
        parts.append(f"its voxel size is {np.round(spacing_m, 4).tolist()} mm, the image's "
                     f"{np.round(spacing_i, 4).tolist()} mm")
    axes_m, axes_i = _axis_words(mask_affine), _axis_words(image_affine)
    if axes_m != axes_i:
        mirrored = [f"{'ijk'[n]}" for n in range(3) if axes_m[n][1] == axes_i[n][1] and axes_m[n] != axes_i[n]]
        parts.append(f"its voxel axes point {'/'.join(axes_m)}, the image's {'/'.join(axes_i)}"
                     + (f" (axis {', '.join(mirrored)} mirrored)" if mirrored else ""))
    elif not np.allclose(mask_affine[:3, :3] / spacing_m, image_affine[:3, :3] / spacing_i, atol=1e-4):
        parts.append("its axes are rotated against the image's (an oblique grid of another angle)")
    if not np.allclose(mask_affine[:3, 3], image_affine[:3, 3], atol=GRID_TOLERANCE_MM):
        parts.append(f"its first voxel lies at RAS {np.round(mask_affine[:3, 3], 3).tolist()} mm, the image's at "
                     f"{np.round(image_affine[:3, 3], 3).tolist()} mm")
    return "; ".join(parts) or f"its voxels lie up to {apart:.3g} mm from the image's"


def mask_grid_error(lesion: int, difference: str) -> InvalidPrompt:
    return InvalidPrompt(f"the mask of lesion {lesion} is not on the image's grid: {difference}. Send a mask with "
                         "the image's own shape, spacing, directions and origin (e.g. resampled onto the image with "
                         "nearest-neighbour interpolation, or saved by the tool that drew it on this image)")


def mask_refs(doc: PromptDocument) -> dict[int, MaskDocument]:
    """Lesion number -> its ``mask`` reference, for the lesions that have one."""
    return {n: mask for n, lesion in numbered_lesions(doc) if (mask := lesion.get("mask"))}


def load_masks(doc: PromptDocument, volume: Volume,
               open_mask: Callable[[str], Volume | None]) -> dict[int, np.ndarray]:
    """Every lesion's mask as ``bool`` on ``volume``'s grid: the voxels of the mask volume
    ``open_mask(volume_id)`` that are the reference's ``label``, or not 0 when it names none.

    Raises:
        InvalidPrompt: a mask volume that no longer exists, is not on the image's grid, or holds
            no voxel of its label.
    """
    masks: dict[int, np.ndarray] = {}
    opened: dict[str, np.ndarray] = {}  # volume id -> its values, rounded to labels
    for n, ref in mask_refs(doc).items():
        volume_id = str(ref.get("volume_id", ""))
        if volume_id not in opened:
            mask = open_mask(volume_id)
            if mask is None:
                raise InvalidPrompt(f"the mask of lesion {n} (volume {volume_id}) no longer exists (it was deleted, or it expired); "
                                    "upload it again")
            difference = grid_difference(mask.shape, mask.affine, volume.shape, volume.affine)
            if difference:
                raise mask_grid_error(n, difference)
            opened[volume_id] = np.rint(np.asarray(mask.array, dtype=np.float32))
        values = opened[volume_id]
        label = ref.get("label")
        masks[n] = values == label if label else values != 0
        if not masks[n].any():
            which = f"voxel of label {label}" if label else "voxel that is not 0"
            raise InvalidPrompt(f"the mask of lesion {n} holds no {which}; send a mask that marks the lesion")
    return masks


