"""NRRD reading (pynrrd), converted to the RAS affine of :class:`~msam_core.io.volume.Volume`.

An NRRD header states its world frame in ``space`` (``left-posterior-superior`` is what 3D Slicer
and ITK write), the world vector of each array axis in ``space directions`` and the position of
voxel ``(0, 0, 0)`` in ``space origin``. With pynrrd's default Fortran index order the returned
array is indexed ``[i, j, k]`` with ``i`` the fastest (first) NRRD axis, so column ``n`` of the
affine is ``space directions[n]``. The frame is then mapped to RAS by flipping the world axes
that point the other way (L->R, P->A, I->S).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msam_core.errors import InvalidVolume
from msam_core.io.volume import Volume

#: Sign of each world axis relative to RAS, per NRRD ``space`` (aliases included).
_SPACE_TO_RAS_SIGNS: dict[str, tuple[float, float, float]] = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}


def nrrd_affine_to_ras(directions: np.ndarray, origin: np.ndarray, space: str) -> np.ndarray:
    """Build the voxel -> RAS affine from NRRD geometry.

    Args:
        directions: ``(3, 3)``, row ``n`` = world vector (mm) of one step along array axis ``n``.
        origin: ``(3,)`` world position (mm) of voxel ``(0, 0, 0)``.
        space: the NRRD ``space`` field (case-insensitive).
    """
    signs = _SPACE_TO_RAS_SIGNS.get(space.strip().lower())
    if signs is None:
        raise InvalidVolume(
            f"NRRD space {space!r} is not an anatomical frame msam can place in RAS; "
            f"supported: {', '.join(sorted(k for k in _SPACE_TO_RAS_SIGNS if '-' in k))}"
        )
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, dtype=np.float64).T
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return np.diag([*signs, 1.0]) @ affine


def read_nrrd(path: str | Path) -> Volume:
    """Read a ``.nrrd`` / ``.nhdr`` file into a :class:`Volume` (affine: voxel -> RAS mm)."""
    import nrrd  # pynrrd

    path = Path(path)
    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as exc:
        raise InvalidVolume(f"cannot read {path.name} as NRRD: {exc}") from exc
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise InvalidVolume(f"{path.name} has shape {data.shape}; expected a 3D scalar image")
    space = header.get("space")
    directions = header.get("space directions")
    if space is None or directions is None:
        raise InvalidVolume(
            f"{path.name} has no 'space' / 'space directions' fields, so its position in the "
            "patient is unknown; re-export it with orientation (e.g. from 3D Slicer)"
        )
    directions = np.asarray(directions, dtype=np.float64)
    directions = directions[np.all(np.isfinite(directions), axis=1)]  # drop non-spatial axes
    if directions.shape != (3, 3):
        raise InvalidVolume(f"{path.name}: expected three spatial axes, got {directions.shape}")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = nrrd_affine_to_ras(directions, origin, str(space))
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype in (np.float64, np.float16):
        data = data.astype(np.float32)
    elif data.dtype == np.bool_:
        data = data.astype(np.uint8)
    return Volume(array=data, affine=affine, modality=None, meta={"format": "nrrd"})
