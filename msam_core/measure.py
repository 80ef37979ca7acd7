"""Lesion measurements from a mask on its image's grid: volume, RECIST axes, 3D diameter,
centroid, intensity statistics, surface area and sphericity.

Every length is measured in world millimetres through the volume's affine (``Volume.affine``,
voxel ``(i, j, k)`` -> RAS), so anisotropic spacing, oblique directions and flipped storage
orders give the same numbers as the same lesion stored any other way. Points are reported in
**LPS** mm (DICOM patient coordinates), the space of the DICOM SR and of radiology workstations.

Conventions:

* The lesion's border is the half-way level between its voxels and the background (value 0.5
  of the mask read as 0/1): scikit-image's ``find_contours`` in a slice, ``marching_cubes`` in
  3D. Lengths are distances between points of that border, so a lesion of one voxel has the
  voxel's size, not zero. The volume is the voxel count x the voxel volume (exact).
* The **acquisition plane** is the plane of the image's slices: for DICOM the slices as stored
  (voxel axis ``k``); for other formats the voxel axis with the largest spacing when one is
  clearly the largest (the thick slices of an acquisition), else the voxel axis closest to the
  patient's superior direction (axial slices).
* **RECIST long axis**: the longest distance between two points of the lesion's border within
  one slice, on the slice where it is largest. **Short axis**: on that slice, the longest extent of the lesion
  perpendicular to the long axis (RECIST 1.1's short axis; for lymph nodes it is the one that
  counts).

Which library computes what:

* voxel count, volume, centroid and intensity statistics: numpy on the mask (exact).
* border: scikit-image (``find_contours``, ``marching_cubes``) in voxel indices, mapped to
  millimetres through the affine's linear part (so oblique and sheared grids are measured in
  the world).
* surface area and sphericity: SimpleITK's label shape statistics (``Perimeter``,
  ``Roundness``) with the image's spacing and directions: its estimate follows the smooth
  surface the voxels sample, where the marching-cubes mesh of a voxel mask overestimates the
  area by its staircase.
* written here, because no library gives them with their endpoints: the farthest pair of
  border points (3D diameter, RECIST long axis; scipy's convex hull gives the candidates, the
  pairs of hull vertices are compared by brute force) and the longest chord of the slice's
  contour perpendicular to the long axis (exact line/segment intersections). SimpleITK's label
  shape statistics compute a Feret diameter, but between voxel centres, without endpoints and
  by comparing every pair of border voxels (quadratic in the lesion's size); the tests compare
  this module's 3D diameter with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from msam_core.io.volume import LPS_TO_RAS, Volume

__all__ = ["Axis", "IntensityStats", "LesionMeasurements", "acquisition_axis", "measure_labels", "measure_lesion"]

#: spacing ratio above which one voxel axis is taken for the slice-stacking axis of a non-DICOM image
_THICK_RATIO = 1.2


@dataclass(frozen=True)
class Axis:
    """A measured line: its length and its endpoints.

    Attributes:
        length_mm: distance between the endpoints (mm).
        start_lps, end_lps: endpoints in LPS mm.
        start_voxel, end_voxel: endpoints as continuous voxel indices ``(i, j, k)`` of the image.
        slice_axis: voxel axis (0, 1, 2 = i, j, k) across the slices of the acquisition plane;
            ``None`` for a 3D line.
        slice_index: the slice along ``slice_axis`` the line lies in; ``None`` for a 3D line.
            It counts slices in the image's grid order, which for DICOM is the order of the slices
            in space, not the instance numbers a PACS shows: hence the next two.
        slice_sop_instance_uid: for a DICOM image, the SOP Instance UID of the image that is that
            slice (the image a PACS viewer would show the line on); else ``None``.
        slice_frame_number: its 1-based frame number when the image is a multi-frame instance.
    """

    length_mm: float
    start_lps: tuple[float, float, float]
    end_lps: tuple[float, float, float]
    start_voxel: tuple[float, float, float]
    end_voxel: tuple[float, float, float]
    slice_axis: int | None = None
    slice_index: int | None = None
    slice_sop_instance_uid: str | None = None
    slice_frame_number: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"length_mm": round(self.length_mm, 2),
                "start_lps": [round(v, 2) for v in self.start_lps], "end_lps": [round(v, 2) for v in self.end_lps],
                "start_voxel": [round(v, 2) for v in self.start_voxel],
                "end_voxel": [round(v, 2) for v in self.end_voxel],
                "slice_axis": self.slice_axis, "slice_index": self.slice_index,
                "slice_sop_instance_uid": self.slice_sop_instance_uid, "slice_frame_number": self.slice_frame_number}


@dataclass(frozen=True)
class IntensityStats:
    """Intensities of the lesion's voxels in the image's own units (``unit``: ``"HU"`` for CT,
    whose DICOM values msam reads after the rescale, else ``"image units"``)."""

    unit: str
    mean: float
    sd: float
    median: float
    min: float
    max: float

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, **{k: round(float(v), 2) for k, v in asdict(self).items() if k != "unit"}}


@dataclass(frozen=True)
class LesionMeasurements:
    """What :func:`measure_lesion` measured for one lesion (lengths in mm, points in LPS mm).

    Attributes:
        voxels: lesion voxel count.
        volume_ml: ``voxels`` x the voxel volume (``|det(affine)|``), in millilitres.
        long_axis: RECIST long axis (longest in-slice diameter, on the slice where it is largest).
        short_axis: longest extent perpendicular to ``long_axis`` on the same slice.
        max_diameter_3d: longest distance between two lesion voxels in 3D.
        centroid_lps: mean position of the lesion's voxel centres.
        intensity: statistics of the image values inside the lesion; ``None`` without an image.
        surface_area_mm2: the lesion's surface area (SimpleITK's estimate).
        sphericity: ``pi^(1/3) (6 V)^(2/3) / A`` (1 for a ball, smaller for other shapes).
    """

    voxels: int
    volume_ml: float
    long_axis: Axis
    short_axis: Axis
    max_diameter_3d: Axis
    centroid_lps: tuple[float, float, float]
    intensity: IntensityStats | None
    surface_area_mm2: float
    sphericity: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lengths rounded to 0.01 mm, volume to 0.001 mL)."""
        return {
            "voxels": self.voxels,
            "volume_ml": round(self.volume_ml, 3),
            "long_axis": self.long_axis.to_json(),
            "short_axis": self.short_axis.to_json(),
            "max_diameter_3d": self.max_diameter_3d.to_json(),
            "centroid_lps": [round(v, 2) for v in self.centroid_lps],
            "intensity": self.intensity.to_json() if self.intensity else None,
            "surface_area_mm2": round(self.surface_area_mm2, 1),
            "sphericity": round(self.sphericity, 4),
        }


def acquisition_axis(volume: Volume) -> int:
    """The voxel axis across the slices of ``volume``'s acquisition plane (see the module's
    conventions): ``2`` for DICOM, else the clearly thickest axis, else the one closest to S."""
    if volume.meta.get("format") == "dicom":
        return 2
    spacing = volume.spacing
    order = np.argsort(spacing)[::-1]
    if spacing[order[0]] > _THICK_RATIO * spacing[order[1]]:
        return int(order[0])
    directions = volume.affine[:3, :3] / spacing
    return int(np.argmax(np.abs(directions[2])))


def _farthest_pair(points: np.ndarray) -> tuple[int, int, float]:
    """Indices of the two rows of ``points`` ``(N, D)`` farthest apart, and their distance: the
    farthest pair lies on the convex hull, so only hull vertices are compared pairwise (SciPy's
    ``pdist``, squared distances: of pairs equally far, the first in row order)."""
    from scipy.spatial.distance import pdist

    n = len(points)
    if n == 1:
        return 0, 0, 0.0
    candidates = np.arange(n)
    if n > 48:
        from scipy.spatial import ConvexHull, QhullError

        try:
            candidates = ConvexHull(points).vertices
        except QhullError:  # flat or collinear: a joggled hull still returns input vertices
            candidates = ConvexHull(points, qhull_options="QJ").vertices
    sub = np.ascontiguousarray(points[candidates], dtype=np.float64)
    d2 = pdist(sub, "sqeuclidean")  # (m choose 2), row-major over i < j
    k = int(np.argmax(d2))
    best = float(d2[k])
    if best == 0.0:  # every candidate at one place
        return int(candidates[0]), int(candidates[0]), 0.0
    rows = np.arange(len(sub))
    starts = rows * len(sub) - rows * (rows + 1) // 2  # condensed index of the pair (i, i + 1)
    i = int(np.searchsorted(starts, k, side="right")) - 1
    j = int(k - starts[i] + i + 1)
    return int(candidates[i]), int(candidates[j]), float(np.sqrt(best))


def _to_lps(volume: Volume, voxels: np.ndarray) -> np.ndarray:
    return volume.voxel_to_ras(voxels) * LPS_TO_RAS[:3, :3].diagonal()


def _axis(volume: Volume, a: np.ndarray, b: np.ndarray, slice_axis: int | None = None,
          slice_index: int | None = None) -> Axis:
    """An :class:`Axis` between continuous voxel positions ``a`` and ``b``."""
    lps = _to_lps(volume, np.stack([a, b]))
    uid, frame = _slice_image(volume, slice_axis, slice_index)
    return Axis(length_mm=float(np.linalg.norm(lps[1] - lps[0])),
                start_lps=tuple(float(v) for v in lps[0]), end_lps=tuple(float(v) for v in lps[1]),  # type: ignore[arg-type]
                start_voxel=tuple(float(v) for v in a), end_voxel=tuple(float(v) for v in b),  # type: ignore[arg-type]
                slice_axis=slice_axis, slice_index=slice_index, slice_sop_instance_uid=uid, slice_frame_number=frame)


def _slice_image(volume: Volume, slice_axis: int | None, slice_index: int | None) -> tuple[str | None, int | None]:
    """The DICOM image (SOP Instance UID, frame number) that is slice ``slice_index`` along
    ``slice_axis`` of ``volume``: a DICOM volume's slices are its images along ``k``, in the order
    its reader put them (``meta["sop_instance_uids"]``, ``meta["frame_numbers"]``)."""
    uids = volume.meta.get("sop_instance_uids") if volume.meta.get("format") == "dicom" else None
    if slice_axis != 2 or slice_index is None or not uids or len(uids) != volume.shape[2]:
        return None, None
    frames = volume.meta.get("frame_numbers") or [None] * len(uids)
    frame = frames[slice_index]
    return str(uids[slice_index]), int(frame) if frame is not None else None


def _in_plane_basis(volume: Volume, slice_axis: int) -> tuple[np.ndarray, list[int]]:
    """``(2, 2)`` matrix from the two in-plane voxel axes to millimetres in an orthonormal basis
    of the slice plane (2D distances are world distances, even for a sheared affine), and
    those two voxel axes."""
    plane = [a for a in range(3) if a != slice_axis]
    cols = volume.affine[:3, plane]  # (3, 2): world direction x spacing of each in-plane voxel axis
    q, _ = np.linalg.qr(cols)
    return q.T @ cols, plane


def _slice_contours(section: np.ndarray) -> list[np.ndarray]:
    """The half-way contours (scikit-image ``find_contours`` at 0.5) of one slice's 2D mask, in
    its pixel indices; closed, since the slice is padded with background."""
    from skimage import measure

    return [c - 1.0 for c in measure.find_contours(np.pad(section.astype(np.float32), 1), 0.5)]


def _perpendicular_chord(xy: np.ndarray, segments: np.ndarray, u: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The longest chord of the contour ``segments`` ``(E, 2, 2)`` (plane mm) perpendicular to the
    unit vector ``u``: ``(length, start, end)`` in plane mm. The extent across ``u`` of the
    contour's crossings with a perpendicular line is piecewise linear in the line's position, so
    its maximum is found among the vertex positions ``xy`` (plus a fine grid between them)."""
    v = np.array([-u[1], u[0]])
    a0, a1 = segments[:, 0] @ u, segments[:, 1] @ u
    c0, c1 = segments[:, 0] @ v, segments[:, 1] @ v
    along = xy @ u
    grid = np.linspace(along.min(), along.max(), 256)
    positions = np.unique(np.concatenate([along, grid]))
    best = (0.0, float(positions[0]), 0.0, 0.0)
    for start in range(0, len(positions), 256):  # bounded memory: 256 lines x E edges at a time
        t = positions[start:start + 256, None]
        lo_a, hi_a = np.minimum(a0, a1), np.maximum(a0, a1)
        crosses = (lo_a <= t) & (t <= hi_a) & (hi_a > lo_a)
        frac = np.where(crosses, (t - a0) / np.where(a1 != a0, a1 - a0, 1.0), 0.0)
        across = c0 + frac * (c1 - c0)
        top = np.where(crosses, across, -np.inf).max(axis=1)
        bottom = np.where(crosses, across, np.inf).min(axis=1)
        extent = np.where(np.isfinite(top) & np.isfinite(bottom), top - bottom, 0.0)
        k = int(np.argmax(extent))
        if extent[k] > best[0]:
            best = (float(extent[k]), float(t[k, 0]), float(bottom[k]), float(top[k]))
    length, t, bottom, top = best
    return length, t * u + bottom * v, t * u + top * v


#: Chords within this many millimetres count as equally long (the first slice's is taken).
_TIE_MM = 1e-9


#: The half-planes ``n . (p, q) <= c`` that bound a slice's contours: its pixels' extent along
#: the two in-plane axes and the two diagonals (an octagon).
_OCTAGON_NORMALS = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0],
                             [1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
#: The pairs of those boundary lines that are not parallel, and the inverses that intersect them.
_OCTAGON_PAIRS = np.array([(i, j) for i in range(8) for j in range(i + 1, 8)
                           if abs(_OCTAGON_NORMALS[i] @ [_OCTAGON_NORMALS[j][1], -_OCTAGON_NORMALS[j][0]]) > 0])
_OCTAGON_INVERSES = np.linalg.inv(_OCTAGON_NORMALS[_OCTAGON_PAIRS])


def _slice_bounds(box: np.ndarray, slice_axis: int, to_plane: np.ndarray) -> dict[int, float]:
    """``{slice: bound}`` for the slices of ``box`` that hold the lesion: no chord of the slice's
    half-way contours is longer than its bound (plane mm, ``to_plane`` from :func:`_in_plane_basis`).

    Every contour point lies half a pixel from a lesion pixel ``(p, q)`` along ``p`` or ``q``, so
    within the octagon of the pixels' extent along ``p``, ``q``, ``p + q`` and ``p - q``, each
    grown by half a pixel; the bound is that octagon's diameter (the farthest pair of its
    corners), a little more than the lesion's (an eighth more for a disc)."""
    pixels = np.argwhere(np.moveaxis(box, slice_axis, 0))  # (slice, p, q), ordered by slice
    if len(pixels) == 0:
        return {}
    slices, starts = np.unique(pixels[:, 0], return_index=True)
    reach = np.maximum.reduceat(pixels[:, 1:].astype(np.float64) @ _OCTAGON_NORMALS.T, starts, axis=0)
    limits = reach + 0.5 * np.abs(_OCTAGON_NORMALS).max(axis=1)  # (slices, 8)
    # the corners: where two boundary lines that are not parallel meet, inside every other one
    corners = np.einsum("kab,skb->ska", _OCTAGON_INVERSES, limits[:, _OCTAGON_PAIRS])  # (slices, pairs, 2)
    inside = np.all(corners @ _OCTAGON_NORMALS.T <= limits[:, None, :] + 1e-9, axis=2)
    mm = corners @ to_plane.T
    far = ((mm[:, :, None, :] - mm[:, None, :, :]) ** 2).sum(-1)
    far[~(inside[:, :, None] & inside[:, None, :])] = 0.0
    return {int(s): float(np.sqrt(d)) + 1e-9 for s, d in zip(slices, far.reshape(len(slices), -1).max(axis=1))}


def _slice_axes(volume: Volume, box: np.ndarray, lo: np.ndarray, slice_axis: int) -> tuple[Axis, Axis]:
    """RECIST long and short axis of the lesion ``box`` (its bounding box, origin ``lo``)."""
    to_plane, plane = _in_plane_basis(volume, slice_axis)
    measured: dict[int, tuple[float, np.ndarray, np.ndarray, list[np.ndarray]]] = {}
    longest = -1.0
    # slices by a bound no chord of theirs exceeds (:func:`_slice_bounds`), largest first: once
    # the bound falls short of the longest chord found, no later slice can hold the long axis
    for bound, s in sorted(((-b, s) for s, b in _slice_bounds(box, slice_axis, to_plane).items())):
        if -bound < longest - _TIE_MM:
            break
        contours = _slice_contours(np.take(box, s, axis=slice_axis))
        pix = np.concatenate(contours)
        xy = pix @ to_plane.T
        i, j, d = _farthest_pair(xy)
        measured[s] = (d, pix[[i, j]], xy[[i, j]], contours)
        longest = max(longest, d)
    s = min(k for k, v in measured.items() if v[0] >= longest - _TIE_MM)  # of equal slices, the first
    length, ends_pix, ends_xy, contours = measured[s]
    segments = np.concatenate([np.stack([c[:-1], c[1:]], axis=1) for c in contours]) @ to_plane.T
    index = int(s + lo[slice_axis])

    def voxel(pixel: np.ndarray) -> np.ndarray:
        out = np.empty(3)
        out[plane] = pixel + lo[plane]
        out[slice_axis] = index
        return out

    long_axis = _axis(volume, voxel(ends_pix[0]), voxel(ends_pix[1]), slice_axis, index)
    if length == 0:
        return long_axis, long_axis
    u = (ends_xy[1] - ends_xy[0]) / length
    _, p, q = _perpendicular_chord(np.concatenate([segments[:, 0], segments[:, 1]]), segments, u)
    to_pixel = np.linalg.inv(to_plane)
    short_axis = _axis(volume, voxel(to_pixel @ p), voxel(to_pixel @ q), slice_axis, index)
    return long_axis, short_axis


def _border_points(box: np.ndarray) -> np.ndarray:
    """The vertices of the marching-cubes surface (scikit-image, level 0.5) of a mask's box, in
    box voxel indices: the lesion's border in 3D."""
    from skimage import measure

    verts, _, _, _ = measure.marching_cubes(np.pad(box.astype(np.float32), 1), 0.5)
    return verts - 1.0


def _area_and_sphericity(box: np.ndarray, volume: Volume) -> tuple[float, float]:
    """Surface area (mm²) and sphericity (SimpleITK's roundness: the area of the ball of the
    same volume over the area) from SimpleITK's label shape statistics, on the box with the
    volume's spacing and directions (the nearest orthonormal directions, for a sheared affine)."""
    import SimpleITK as sitk

    linear = volume.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    u, _, vt = np.linalg.svd(linear / spacing)
    image = sitk.GetImageFromArray(np.ascontiguousarray(box.astype(np.uint8).transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (u @ vt).reshape(-1)])
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOn()
    stats.Execute(image)
    return float(stats.GetPerimeter(1)), float(stats.GetRoundness(1))


def measure_lesion(mask: np.ndarray, volume: Volume, *, slice_axis: int | None = None,
                   hounsfield: bool | None = None) -> LesionMeasurements | None:
    """Measure the lesion ``mask`` (``bool``, shape ``volume.shape``) on ``volume``.

    Args:
        mask: the lesion's voxels on ``volume``'s grid (``volume.array`` layout).
        volume: the image (its affine gives every length; its values the intensity statistics).
        slice_axis: voxel axis across the acquisition plane's slices for the RECIST axes
            (default :func:`acquisition_axis`).
        hounsfield: the image's values are CT Hounsfield units (the pipeline's
            :class:`~msam_core.pipeline.preprocess.IntensityProfile` says so for a CT without a
            modality in its header); default: the volume's modality is CT.

    Returns:
        The measurements, or ``None`` for an empty mask.

    Raises:
        ValueError: ``mask`` is not on ``volume``'s grid.
    """
    m = np.asarray(mask, dtype=bool)
    if m.shape != volume.shape:
        raise ValueError(f"mask shape {m.shape} differs from the image's {volume.shape}")
    idx_all = np.argwhere(m)
    if idx_all.size == 0:
        return None
    lo, hi = idx_all.min(axis=0), idx_all.max(axis=0) + 1
    return measure_box(m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], lo, volume, slice_axis=slice_axis,
                       hounsfield=hounsfield)


def measure_box(box: np.ndarray, lo: np.ndarray | tuple[int, int, int], volume: Volume, *,
                slice_axis: int | None = None, hounsfield: bool | None = None) -> LesionMeasurements | None:
    """:func:`measure_lesion` of a mask given as a box of ``volume``'s grid: ``box`` (``bool``)
    covers the voxels ``lo .. lo + box.shape - 1`` and the rest of the grid is background. The
    same numbers as the whole-grid mask, without scanning the whole grid (an interactive
    session's masks are kept this way).

    Raises:
        ValueError: the box does not lie inside ``volume``'s grid.
    """
    lo = np.asarray(lo, np.int64)
    b = np.asarray(box, dtype=bool)
    if b.ndim != 3 or np.any(lo < 0) or np.any(lo + np.asarray(b.shape) > np.asarray(volume.shape)):
        raise ValueError(f"a box of shape {b.shape} at {lo.tolist()} does not lie inside the image's grid "
                         f"{volume.shape}")
    inside = np.argwhere(b)
    if inside.size == 0:
        return None
    idx_all = inside + lo  # grid indices of the lesion's voxels
    a, z = inside.min(axis=0), inside.max(axis=0) + 1  # tighten the box to the foreground
    box = b[a[0]:z[0], a[1]:z[1], a[2]:z[2]]
    lo, hi = lo + a, lo + z
    axis = acquisition_axis(volume) if slice_axis is None else int(slice_axis)

    voxels = int(len(idx_all))
    voxel_mm3 = float(abs(np.linalg.det(volume.affine[:3, :3])))
    volume_mm3 = voxels * voxel_mm3
    long_axis, short_axis = _slice_axes(volume, box, lo, axis)
    verts = _border_points(box)
    area, sphericity = _area_and_sphericity(box, volume)
    i, j, _ = _farthest_pair(verts @ volume.affine[:3, :3].T)
    diameter = _axis(volume, verts[i] + lo, verts[j] + lo)
    centroid = _to_lps(volume, idx_all.mean(axis=0))[0]

    values = np.asarray(volume.array)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][box].astype(np.float64)
    if hounsfield is None:
        hounsfield = (volume.modality or "").upper() == "CT"
    unit = "HU" if hounsfield else "image units"
    intensity = IntensityStats(unit=unit, mean=float(values.mean()), sd=float(values.std()),
                               median=float(np.median(values)), min=float(values.min()), max=float(values.max()))
    return LesionMeasurements(voxels=voxels, volume_ml=volume_mm3 / 1000.0, long_axis=long_axis,
                              short_axis=short_axis, max_diameter_3d=diameter,
                              centroid_lps=tuple(float(v) for v in centroid),  # type: ignore[arg-type]
                              intensity=intensity, surface_area_mm2=area, sphericity=sphericity)


def measure_labels(labels: np.ndarray, volume: Volume, *, slice_axis: int | None = None,
                   hounsfield: bool | None = None) -> dict[int, LesionMeasurements]:
    """:func:`measure_lesion` for every label ``> 0`` of a label map on ``volume``'s grid."""
    arr = np.asarray(labels)
    out: dict[int, LesionMeasurements] = {}
    for label in (int(v) for v in np.unique(arr) if v > 0):
        measured = measure_lesion(arr == label, volume, slice_axis=slice_axis, hounsfield=hounsfield)
        if measured is not None:
            out[label] = measured
    return out


def table(measured: dict[int, LesionMeasurements | None]) -> str:
    """A short text table, one row per lesion: volume, RECIST long and short axis, 3D diameter
    and mean intensity (what ``msam segment`` prints)."""
    rows = [f"{'lesion':>6}  {'voxels':>8}  {'volume mL':>9}  {'long mm':>7}  {'short mm':>8}  {'3D mm':>6}  "
            f"{'slice':>5}  mean intensity"]
    for label, m in sorted(measured.items()):
        if m is None:
            rows.append(f"{label:>6}  {0:>8}  (empty: nothing to measure)")
            continue
        mean = f"{m.intensity.mean:.1f} {m.intensity.unit}" if m.intensity else "-"
        rows.append(f"{label:>6}  {m.voxels:>8}  {m.volume_ml:>9.2f}  {m.long_axis.length_mm:>7.1f}  "
                    f"{m.short_axis.length_mm:>8.1f}  {m.max_diameter_3d.length_mm:>6.1f}  "
                    f"{m.long_axis.slice_index:>5}  {mean}")
    return "\n".join(rows)
