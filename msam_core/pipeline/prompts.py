"""Typed prompts and their validation against an image.

A request holds points and boxes, each stated in one of three spaces:

* ``"voxel"``: array indices ``(i, j, k)`` of the input image as read (for NIfTI: nibabel's
  ``img.dataobj[i, j, k]``); integer values are voxel centres.
* ``"RAS"``: world millimetres, +x Right, +y Anterior, +z Superior (NIfTI's world).
* ``"LPS"``: world millimetres, +x Left, +y Posterior, +z Superior (DICOM's world).

:func:`resolve_prompts` turns them, plus an optional prior mask, into one :class:`LesionPrompt`
per lesion, with every point in RAS millimetres. Several lesions in one request are told apart by
their ``lesion`` number, which becomes the label of that lesion in the output mask.

Boxes (SAM-Med3D's decoder takes no box prompt) are used twice: the crop is centred on the box
centre, the model gets a positive click at that centre, and the result is clipped to the box.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np

from msam_core.errors import InvalidPrompt
from msam_core.io.volume import LPS_TO_RAS, Volume

Space = Literal["voxel", "LPS", "RAS"]
SPACES: tuple[str, ...] = ("voxel", "LPS", "RAS")
MAX_LESIONS = 255


def _check_space(space: str) -> str:
    for name in SPACES:
        if space.lower() == name.lower():
            return name
    raise InvalidPrompt(f"unknown coordinate space {space!r}; use one of {', '.join(SPACES)}")


def _finite_xyz(values: Sequence[float], what: str) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (3,):
        raise InvalidPrompt(f"{what} needs exactly 3 coordinates, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise InvalidPrompt(f"{what} has a coordinate that is not a finite number: {arr.tolist()}")
    return float(arr[0]), float(arr[1]), float(arr[2])


@dataclass(frozen=True)
class Point:
    """A click. ``label`` 1 = inside the lesion (positive), 0 = outside (negative)."""

    xyz: tuple[float, float, float]
    label: int = 1
    space: Space = "voxel"
    lesion: int = 1


@dataclass(frozen=True)
class Box:
    """An axis-aligned box given by two opposite corners (inclusive), in ``space``.

    A voxel box is aligned with the image's array axes; a world box with the world axes.
    """

    corner0: tuple[float, float, float]
    corner1: tuple[float, float, float]
    space: Space = "voxel"
    lesion: int = 1


@dataclass(frozen=True)
class ResolvedBox:
    """A validated box: ``lo``/``hi`` inclusive corners in input voxel indices
    (``space == "voxel"``) or RAS mm (``space == "RAS"``); ``center_ras`` in RAS mm."""

    lo: np.ndarray
    hi: np.ndarray
    space: Literal["voxel", "RAS"]
    center_ras: np.ndarray

    def contains_ras(self, points_ras: np.ndarray, volume: Volume) -> np.ndarray:
        """``(N,)`` bool: which of ``points_ras`` ``(N, 3)`` lie inside the box."""
        pts = points_ras if self.space == "RAS" else volume.ras_to_voxel(points_ras)
        margin = 0.0 if self.space == "RAS" else 0.5  # a voxel index covers +-half a voxel
        return np.all((pts >= self.lo - margin) & (pts <= self.hi + margin), axis=1)


@dataclass
class LesionPrompt:
    """Everything known about one lesion, in RAS mm.

    Attributes:
        lesion: label of this lesion in the output (1..255).
        points_ras: ``(N, 3)`` clicks in RAS mm, in the order given.
        labels: ``(N,)`` int64, 1 positive / 0 negative.
        box: optional box (crop centre, positive centre click, clipping).
        prior: optional ``bool`` mask on the input grid (shape of the volume) to refine.
        center_ras: ``(3,)`` RAS mm where the first crop is centred: the first positive click,
            else the box centre, else the deepest point of the prior mask.
    """

    lesion: int
    points_ras: np.ndarray
    labels: np.ndarray
    center_ras: np.ndarray
    box: ResolvedBox | None = None
    prior: np.ndarray | None = field(default=None, repr=False)


def to_ras(points: np.ndarray, space: str, volume: Volume) -> np.ndarray:
    """``(N, 3)`` points in ``space`` -> ``(N, 3)`` RAS mm for ``volume``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    space = _check_space(space)
    if space == "RAS":
        return pts.copy()
    if space == "LPS":
        return pts * LPS_TO_RAS[:3, :3].diagonal()
    return volume.voxel_to_ras(pts)


def _inside_image(points_voxel: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``(N,)`` bool: continuous voxel positions within the image's extent (voxel edges)."""
    upper = np.asarray(shape, dtype=np.float64) - 0.5
    return np.all((points_voxel >= -0.5) & (points_voxel <= upper), axis=1)


def _resolve_box(box: Box, volume: Volume) -> ResolvedBox:
    c0 = np.asarray(_finite_xyz(box.corner0, "box corner"))
    c1 = np.asarray(_finite_xyz(box.corner1, "box corner"))
    space = _check_space(box.space)
    if space == "voxel":
        lo, hi = np.minimum(c0, c1), np.maximum(c0, c1)
        center_ras = volume.voxel_to_ras((lo + hi) / 2)[0]
        kind: Literal["voxel", "RAS"] = "voxel"
    else:
        r0, r1 = to_ras(c0, space, volume)[0], to_ras(c1, space, volume)[0]
        lo, hi = np.minimum(r0, r1), np.maximum(r0, r1)
        if np.any(hi - lo <= 0):
            raise InvalidPrompt(
                f"box {c0.tolist()}-{c1.tolist()} ({space}) is flat: give two opposite corners "
                "that differ in every coordinate"
            )
        center_ras = (lo + hi) / 2
        kind = "RAS"
    center_voxel = volume.ras_to_voxel(center_ras)
    if not _inside_image(center_voxel, volume.shape)[0]:
        raise InvalidPrompt(
            f"the centre of box {c0.tolist()}-{c1.tolist()} ({space}) is outside the image "
            f"(voxel {np.round(center_voxel[0], 1).tolist()}, image shape {list(volume.shape)})"
        )
    return ResolvedBox(lo=lo, hi=hi, space=kind, center_ras=center_ras)


def deepest_point_voxel(mask: np.ndarray) -> np.ndarray:
    """``(3,)`` voxel index of the point of ``mask`` farthest from its boundary (bounding box
    only, so this stays cheap on large images)."""
    from scipy import ndimage

    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    sub = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)
    dist = ndimage.distance_transform_edt(sub)
    best = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.asarray(best, dtype=np.float64) - 1 + lo


def resolve_prompts(
    volume: Volume,
    points: Sequence[Point] = (),
    boxes: Sequence[Box] = (),
    prior: np.ndarray | None = None,
    lesion_priors: Mapping[int, np.ndarray] | None = None,
) -> list[LesionPrompt]:
    """Validate prompts against ``volume`` and group them per lesion (sorted by lesion number).

    Args:
        volume: the input image (its affine defines voxel <-> RAS).
        points: clicks, each in its own space.
        boxes: at most one box per lesion.
        prior: optional label mask on the input grid, shape ``volume.shape``; label ``k`` is the
            prior of lesion ``k``, except that a one-label prior goes to the one lesion the
            points/boxes prompt (if they prompt one). A lesion may be given by its prior alone.
        lesion_priors: the same per lesion: lesion number -> its own mask (``bool``, shape
            ``volume.shape``), for masks that overlap or come as separate files; a lesion may
            not have both kinds.

    Raises:
        InvalidPrompt: a point/box outside the image or not finite, a label other than 0/1, a
            lesion with no positive click, box or prior, several boxes for one lesion, a prior of
            the wrong shape or empty.
    """
    by_lesion: dict[int, list[tuple[np.ndarray, int]]] = {}
    labels_at: dict[int, dict[tuple[float, ...], int]] = {}  # lesion -> position (RAS) -> its label
    for point in points:
        xyz = np.asarray(_finite_xyz(point.xyz, "point"))
        if point.label not in (0, 1):
            raise InvalidPrompt(f"point label must be 1 (positive) or 0 (negative), got {point.label}")
        lesion = _check_lesion(point.lesion)
        space = _check_space(point.space)
        ras = to_ras(xyz, space, volume)[0]
        vox = volume.ras_to_voxel(ras)
        if not _inside_image(vox, volume.shape)[0]:
            raise InvalidPrompt(
                f"point {xyz.tolist()} ({space}) is outside the image: it falls at voxel "
                f"{np.round(vox[0], 1).tolist()} but the image has shape {list(volume.shape)}: its voxels "
                "cover positions -0.5 to shape-0.5 on each axis (voxel centres 0 to shape-1)"
            )
        said = labels_at.setdefault(lesion, {})
        if said.setdefault(tuple(ras.tolist()), int(point.label)) != int(point.label):
            raise InvalidPrompt(f"point {xyz.tolist()} ({space}) is both a positive and a negative click of lesion "
                                f"{lesion}; keep one of them (in a session: undo the earlier click)")
        by_lesion.setdefault(lesion, []).append((ras, int(point.label)))

    box_by_lesion: dict[int, ResolvedBox] = {}
    for box in boxes:
        lesion = _check_lesion(box.lesion)
        if lesion in box_by_lesion:
            raise InvalidPrompt(f"lesion {lesion} has several boxes; give one box per lesion")
        box_by_lesion[lesion] = _resolve_box(box, volume)

    prior_labels: dict[int, np.ndarray] = {}
    if prior is not None:
        prior = np.asarray(prior)
        if prior.shape != volume.shape:
            raise InvalidPrompt(
                f"the prior mask has shape {list(prior.shape)} but the image has shape "
                f"{list(volume.shape)}; give a mask on the image's own grid"
            )
        found = np.unique(prior)
        odd = [v for v in found if not np.isfinite(v) or v < 0 or v != np.round(v)]
        if odd:
            raise InvalidPrompt(
                f"the prior mask holds {float(odd[0]):g}: its values must be lesion labels (0 background, 1, 2, "
                "...); threshold or round a probability map first (e.g. prior >= 0.5)")
        values = [int(v) for v in found if v != 0]
        if not values:
            raise InvalidPrompt("the prior mask is empty (no voxel is > 0)")
        prompted = set(by_lesion) | set(box_by_lesion)
        if len(values) == 1 and len(prompted) <= 1:
            # a one-label prior refines the one lesion prompted otherwise (if any)
            prior_labels[next(iter(prompted), None) or _check_lesion(values[0])] = prior != 0
        else:
            for v in values:
                prior_labels[_check_lesion(v)] = prior == v

    for lesion, mask in (lesion_priors or {}).items():
        lesion = _check_lesion(lesion)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != volume.shape:
            raise InvalidPrompt(f"the mask of lesion {lesion} has shape {list(mask.shape)} but the image has shape "
                                f"{list(volume.shape)}; give a mask on the image's own grid")
        if lesion in prior_labels:
            raise InvalidPrompt(f"lesion {lesion} has two prior masks (a label of the prior and its own mask); give one")
        if not mask.any():
            raise InvalidPrompt(f"the mask of lesion {lesion} is empty (no voxel of it is set)")
        prior_labels[lesion] = mask

    lesions = sorted(set(by_lesion) | set(box_by_lesion) | set(prior_labels))
    if not lesions:
        raise InvalidPrompt("no prompt given: add at least one positive point, a box or a prior mask")
    result = []
    for lesion in lesions:
        entries = by_lesion.get(lesion, [])
        pts = np.array([e[0] for e in entries], dtype=np.float64).reshape(-1, 3)
        labels = np.array([e[1] for e in entries], dtype=np.int64)
        box = box_by_lesion.get(lesion)
        mask = prior_labels.get(lesion)
        if np.any(labels == 1):
            center = pts[int(np.argmax(labels == 1))]
        elif box is not None:
            center = box.center_ras
        elif mask is not None:
            center = volume.voxel_to_ras(deepest_point_voxel(mask))[0]
        else:
            raise InvalidPrompt(
                f"lesion {lesion} has no positive point (label 1), box or prior mask: "
                "negative points only say where the lesion is not"
            )
        result.append(LesionPrompt(lesion=lesion, points_ras=pts, labels=labels,
                                   center_ras=np.asarray(center, dtype=np.float64),
                                   box=box, prior=mask))
    return result


def _check_lesion(lesion: int) -> int:
    if int(lesion) != lesion or not 1 <= int(lesion) <= MAX_LESIONS:
        raise InvalidPrompt(f"lesion number must be an integer from 1 to {MAX_LESIONS}, got {lesion}")
    return int(lesion)
