"""NRRD reading (pynrrd), converted to the RAS affine of :class:`~msam_core.io.volume.Volume`.

An NRRD header states its world frame in ``space`` (``left-posterior-superior`` is what 3D Slicer
and ITK write), the world vector of each array axis in ``space directions`` and the position of
voxel ``(0, 0, 0)`` in ``space origin``. With pynrrd's default Fortran index order the returned
array is indexed ``[i, j, k]`` with ``i`` the fastest (first) NRRD axis, so column ``n`` of the
affine is ``space directions[n]``. The frame is then mapped to RAS by flipping the world axes
that point the other way (L->R, P->A, I->S).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from msam_core.errors import InvalidVolume
from msam_core.io.bounded import Codec, decompress_to
from msam_core.io.volume import Volume

#: NRRD encodings whose data pynrrd expands in memory in one go, and the codec of each.
COMPRESSED_ENCODINGS: dict[str, Codec] = {"gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
_MAX_HEADER_BYTES = 1 << 20

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


def _read_head(f) -> list[bytes]:  # noqa: ANN001 - a binary file
    """The header lines of an attached-header NRRD, up to and including the blank line."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = f.readline(_MAX_HEADER_BYTES + 1)
        size += len(line)
        if not line or size > _MAX_HEADER_BYTES:
            raise InvalidVolume("the NRRD header has no end (a blank line before the data) within "
                                f"{_MAX_HEADER_BYTES // 1024} KB; is this an NRRD file?")
        lines.append(line)
        if not line.strip():
            return lines


def decompress_nrrd(src: str | Path, dst: str | Path, max_bytes: int) -> bool:
    """Rewrite an NRRD whose data is gzip or bzip2 encoded as the same NRRD with raw data,
    expanding no more than the header declares (``sizes`` x the type's size, plus ``byte
    skip``) and one byte more, to tell a stream that goes on; the rest is never decompressed.

    pynrrd expands a compressed stream completely before it compares the result with the
    header, so a small file declaring a few voxels can hold gigabytes of zeros. The rewritten
    file is what gets decoded and stored.

    Returns False (``dst`` not written) when the data is not compressed.

    Raises:
        InvalidVolume: unreadable header; declared data larger than ``max_bytes``; a ``line skip``
            or ``byte skip: -1`` with compressed data (their meaning depends on the whole stream);
            a stream that ends before the declared data or goes on after it.
    """
    import nrrd  # pynrrd

    with open(src, "rb") as f:
        lines = _read_head(f)
        try:
            header = nrrd.read_header(iter(lines))
            encoding = str(header["encoding"]).lower()
            sizes = [int(n) for n in header["sizes"]]
            itemsize = int(nrrd.reader._determine_datatype(header).itemsize)  # noqa: SLF001 - pynrrd's mapping
        except Exception as exc:  # pynrrd raises several types on broken headers
            raise InvalidVolume(f"the NRRD header cannot be read ({type(exc).__name__}); is the file complete?") from exc
        codec = COMPRESSED_ENCODINGS.get(encoding)
        if codec is None:
            return False
        line_skip = int(header.get("line skip", header.get("lineskip", 0)))
        byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
        if line_skip or byte_skip < 0:
            raise InvalidVolume(f"the NRRD header combines encoding {encoding} with a line skip or a byte skip of "
                                "-1; re-save the image with plain gzip encoding (e.g. from 3D Slicer)")
        need = byte_skip + math.prod(sizes) * itemsize
        if need > max_bytes:
            raise InvalidVolume(f"the NRRD data would decode to {need // 2**20} MB, more than the limit of "
                                f"{max_bytes // 2**20} MB (MSAM_MAX_DECOMPRESSED_MB)")
        with open(dst, "wb") as out:
            for line in lines:
                out.write(re.sub(rb"^(encoding\s*:).*$", rb"\1 raw", line.rstrip(b"\r\n")) + b"\n")
            written, _ = decompress_to(f, out, codec, need + 1, "the NRRD data")
    if written < need:
        raise InvalidVolume(f"the NRRD data ends after {written} of the {need} bytes its header declares; "
                            "is the file complete?")
    if written > need:  # pynrrd refuses this too, but only after expanding all of it
        raise InvalidVolume(f"the NRRD's {encoding} data holds more than the {need} bytes its header declares "
                            "(sizes x type); the header and the data do not match")
    return True
