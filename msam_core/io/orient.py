"""Exact reorientation to the closest RAS axis order (permute / flip only, no interpolation)."""

from __future__ import annotations

import nibabel.orientations as nio
import numpy as np

from msam_core.io.volume import Volume


def ras_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel ``ornt`` (``(3, 2)``: target axis, flip) taking voxel axes closest to R, A, S."""
    return nio.io_orientation(np.asarray(affine, dtype=np.float64))


def reorient_to_ras(volume: Volume) -> Volume:
    """Permute/flip ``volume`` so that its array axes run (as closely as possible) along R, A, S.

    The voxels are not interpolated: the result samples exactly the same points in space, and
    its affine (voxel -> RAS mm) is updated so that physical positions are unchanged. An oblique
    image stays oblique (its axes are only the *closest* to R, A, S).
    """
    ornt = ras_orientation(volume.affine)
    array = nio.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nio.inv_ornt_aff(ornt, volume.shape)
    return Volume(array=np.ascontiguousarray(array), affine=affine, modality=volume.modality,
                  meta=dict(volume.meta))


def reorient_array_like(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Apply to ``array`` (shape of the image with ``affine``) the same permute/flip as
    :func:`reorient_to_ras` applies to that image."""
    return nio.apply_orientation(array, ras_orientation(affine))
