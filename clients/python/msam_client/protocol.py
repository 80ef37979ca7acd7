"""The msam HTTP protocol as this client speaks it: routes and the mask delta encoding.

A mask delta (``delta`` of an interaction's answer) is the box ``lo <= (i, j, k) < hi`` of the
volume's voxel grid and the lesion's mask inside it: the box's voxels in C order (``i`` slowest,
``k`` fastest), one bit each, packed eight to a byte with the first voxel in the least
significant bit, zlib-compressed (RFC 1950), base64-encoded. It applies to the lesion's mask
after the interaction ``base`` (``None``: to an empty mask).
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

DELTA_ENCODING = "zlib-packbits-le-c"

VOLUMES = "/volumes"
SEGMENT = "/segment"
SESSIONS = "/sessions"


def job(job_id: str) -> str:
    return f"/jobs/{job_id}"


def job_result(job_id: str) -> str:
    return f"/jobs/{job_id}/result"


def session(session_id: str) -> str:
    return f"/sessions/{session_id}"


def lesions(session_id: str) -> str:
    return f"/sessions/{session_id}/lesions"


def interactions(session_id: str, lesion: int) -> str:
    return f"/sessions/{session_id}/lesions/{lesion}/interactions"


def interaction(session_id: str, interaction_id: str) -> str:
    return f"/sessions/{session_id}/interactions/{interaction_id}"


def lesion_verb(session_id: str, lesion: int, verb: str) -> str:
    """``undo``, ``reset`` or ``mask`` of a lesion."""
    return f"/sessions/{session_id}/lesions/{lesion}/{verb}"


def commit(session_id: str) -> str:
    return f"/sessions/{session_id}/commit"


def decode_box(data: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A delta's ``data`` -> the bool mask of its box (``shape = hi - lo``)."""
    raw = zlib.decompress(base64.b64decode(data))
    n = int(np.prod(shape))
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"mask data of {len(raw)} bytes does not fit a box of shape {list(shape)}")
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=n, bitorder="little")
    return bits.astype(bool).reshape(shape)


def encode_box(mask: np.ndarray) -> str:
    """A box's bool mask -> a delta's ``data``."""
    packed = np.packbits(np.ascontiguousarray(mask, bool).ravel(), bitorder="little")
    return base64.b64encode(zlib.compress(packed.tobytes(), 6)).decode("ascii")


def apply_delta(mask: np.ndarray, delta: dict | None, base_empty: bool) -> None:
    """Apply an answer's delta in place to ``mask`` (the volume's shape); ``base_empty``: the
    answer's ``base`` is ``None`` (the delta is over an empty mask)."""
    if base_empty:
        mask[...] = False
    if not delta:
        return
    if delta.get("encoding", DELTA_ENCODING) != DELTA_ENCODING:
        raise ValueError(f"unknown delta encoding {delta.get('encoding')!r}")
    lo, hi = delta["lo"], delta["hi"]
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = decode_box(delta["data"], tuple(h - l for l, h in zip(lo, hi)))
