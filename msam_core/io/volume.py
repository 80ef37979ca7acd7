"""The one image type that flows through msam.

A :class:`Volume` is a 3D array plus the 4x4 affine that maps voxel indices ``(i, j, k)`` of that
array to **RAS** millimetres (+x towards the patient's Right, +y Anterior, +z Superior; DICOM's
LPS has +x Left, +y Posterior). NIfTI stores RAS already; DICOM's
LPS is converted at the DICOM boundary (``msam_core.io.dicom``) and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msam_core.errors import InvalidVolume

#: Flips the first two world axes: RAS <-> LPS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """A 3D image with its geometry.

    Attributes:
        array: voxel data, shape ``(I, J, K)``, indexed ``array[i, j, k]``.
        affine: ``(4, 4)`` float64, voxel index ``(i, j, k, 1)`` -> RAS millimetres.
        modality: ``"CT"``, ``"MR"``, ... when known, else ``None``.
        meta: non-PHI facts about the source (format, series UID, ...). Never patient data.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise InvalidVolume(
                f"expected a 3D image, got {array.ndim} dimension(s) with shape {array.shape}; "
                "send a single 3D volume (for 4D series pick one time point)"
            )
        if min(array.shape) < 1:
            raise InvalidVolume(f"the image is empty (shape {array.shape})")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InvalidVolume("the image affine must be a finite 4x4 matrix")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise InvalidVolume("the image affine is singular: voxel spacing or directions are degenerate")
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def voxel_to_ras(self, points_voxel: np.ndarray) -> np.ndarray:
        """``(N, 3)`` voxel indices -> ``(N, 3)`` RAS mm."""
        p = np.asarray(points_voxel, dtype=np.float64).reshape(-1, 3)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def ras_to_voxel(self, points_ras: np.ndarray) -> np.ndarray:
        """``(N, 3)`` RAS mm -> ``(N, 3)`` continuous voxel indices."""
        p = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
        inv = np.linalg.inv(self.affine)
        return p @ inv[:3, :3].T + inv[:3, 3]
