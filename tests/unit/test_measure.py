"""Lesion measurements on analytic phantoms: ellipsoids of known axes, voxelised on grids that are
anisotropic, oblique, rotated against the lesion and stored in flipped and permuted orders.

Expected values come from the ellipsoid alone: the volume is the voxel count x the voxel volume
(exactly) and close to 4/3 pi a b c; the 3D diameter is twice the largest semi-axis; the RECIST
long and short axes are the axes of the ellipse the acquisition plane cuts through the centre
(the largest section of an ellipsoid). Diameters must be within one voxel diagonal.
"""

from __future__ import annotations

import numpy as np
import pytest

from msam_core.io.volume import Volume
from msam_core.measure import acquisition_axis, measure_labels, measure_lesion
from tests.unit.io.dicom_synth import rotation


def ellipsoid(shape, affine_ras, centre_ras, semi_axes, orientation=np.eye(3)):
    """``bool`` mask of the voxels whose centres lie in the ellipsoid (axes = the columns of
    ``orientation``, in RAS)."""
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    world = ijk @ affine_ras[:3, :3].T + affine_ras[:3, 3] - centre_ras
    local = world @ orientation
    inside = np.sum((local / np.asarray(semi_axes)) ** 2, axis=1) <= 1.0
    return inside.reshape(shape)


def grid(spacing, directions=np.eye(3), origin=(0.0, 0.0, 0.0)):
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions) * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def section_axes(semi_axes, orientation, plane_dirs):
    """Full axes (mm) of the ellipse cut by the plane spanned by ``plane_dirs`` (3x2, unit
    columns) through the ellipsoid's centre: (long, short)."""
    q = orientation @ np.diag(1.0 / np.asarray(semi_axes, float) ** 2) @ orientation.T
    e = np.linalg.qr(plane_dirs)[0]
    eig = np.linalg.eigvalsh(e.T @ q @ e)
    return 2 / np.sqrt(eig.min()), 2 / np.sqrt(eig.max())


def centre_of(shape, affine):
    """A voxel centre near the middle of the grid (so the central section is a slice)."""
    return affine[:3, :3] @ (np.asarray(shape) // 2) + affine[:3, 3]


CASES = {
    # name: (shape, spacing, grid directions, lesion orientation, semi-axes mm)
    "isotropic aligned": ((64, 64, 64), (1.0, 1.0, 1.0), np.eye(3), np.eye(3), (20.0, 11.0, 15.0)),
    "anisotropic aligned": ((80, 70, 36), (0.7, 0.9, 2.5), np.eye(3), np.eye(3), (22.0, 12.0, 17.0)),
    "rotated in plane": ((80, 80, 36), (0.8, 0.8, 2.0), np.eye(3), rotation((0, 0, 1), 33), (24.0, 10.0, 14.0)),
    "rotated obliquely": ((80, 80, 60), (0.8, 0.8, 1.2), np.eye(3), rotation((1, 2, 0.5), 40), (22.0, 9.0, 13.0)),
    "oblique grid": ((80, 80, 36), (0.75, 0.75, 2.0), rotation((1, -1, 0.3), 25), np.eye(3), (20.0, 12.0, 16.0)),
    "oblique grid, lesion rotated": ((84, 84, 40), (0.7, 0.7, 2.0), rotation((0.2, 1, 0), 20),
                                      rotation((1, 0, 1), 50), (21.0, 10.0, 15.0)),
    "flipped storage": ((80, 70, 36), (0.7, 0.9, 2.5), np.diag([-1.0, 1.0, -1.0]), rotation((0, 0, 1), -20),
                        (22.0, 12.0, 17.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ellipsoid_phantoms(name: str) -> None:
    shape, spacing, directions, orientation, semi = CASES[name]
    affine = grid(spacing, directions, origin=(-30.0, 12.0, -40.0))
    centre = centre_of(shape, affine)
    mask = ellipsoid(shape, affine, centre, semi, orientation)
    image = np.where(mask, 45, -80).astype(np.int16)
    volume = Volume(image, affine, modality="CT")
    m = measure_lesion(mask, volume)
    assert m is not None
    voxel_mm3 = float(np.prod(spacing))
    diagonal = float(np.linalg.norm(spacing))

    assert m.voxels == int(mask.sum())
    assert m.volume_ml == pytest.approx(m.voxels * voxel_mm3 / 1000.0, rel=1e-12)
    assert m.volume_ml == pytest.approx(4 / 3 * np.pi * np.prod(semi) / 1000.0, rel=0.03)

    assert abs(m.max_diameter_3d.length_mm - 2 * max(semi)) <= diagonal
    axis = acquisition_axis(volume)
    assert axis == int(np.argmax(spacing)) if max(spacing) > 1.2 * sorted(spacing)[1] else True
    plane = [a for a in range(3) if a != axis]
    long_true, short_true = section_axes(semi, orientation, directions[:, plane])
    assert abs(m.long_axis.length_mm - long_true) <= diagonal, (m.long_axis.length_mm, long_true)
    assert abs(m.short_axis.length_mm - short_true) <= diagonal, (m.short_axis.length_mm, short_true)
    assert m.short_axis.length_mm <= m.long_axis.length_mm + 1e-9

    # the axes lie in one slice of the acquisition plane, the short one perpendicular to the long one
    for line in (m.long_axis, m.short_axis):
        assert line.slice_axis == axis
        assert line.start_voxel[axis] == line.end_voxel[axis] == line.slice_index
        lps = np.subtract(line.end_lps, line.start_lps)
        assert np.linalg.norm(lps) == pytest.approx(line.length_mm)
    long_dir = np.subtract(m.long_axis.end_lps, m.long_axis.start_lps)
    short_dir = np.subtract(m.short_axis.end_lps, m.short_axis.start_lps)
    assert abs(long_dir @ short_dir) / (np.linalg.norm(long_dir) * np.linalg.norm(short_dir)) < 1e-6
    # endpoints in LPS: the RAS position of the voxel, x and y negated
    start_ras = volume.voxel_to_ras(np.asarray(m.long_axis.start_voxel))[0]
    assert np.allclose(m.long_axis.start_lps, start_ras * [-1, -1, 1])
    centre_lps = centre * [-1, -1, 1]
    assert np.linalg.norm(np.subtract(m.centroid_lps, centre_lps)) < 0.5 * diagonal

    assert m.intensity is not None and m.intensity.unit == "HU"
    assert (m.intensity.mean, m.intensity.sd, m.intensity.min, m.intensity.max) == (45.0, 0.0, 45.0, 45.0)
    a, b, c = semi
    p = 1.6075  # Knud Thomsen's approximation of the ellipsoid's area (within 1.1 %)
    area_true = 4 * np.pi * ((a ** p * b ** p + a ** p * c ** p + b ** p * c ** p) / 3) ** (1 / p)
    assert m.surface_area_mm2 == pytest.approx(area_true, rel=0.05)
    assert 0 < m.sphericity < 1


def test_same_mask_in_other_storage_orders_measures_the_same() -> None:
    """One lesion, stored as read and with its axes flipped and permuted (the affine following):
    every measurement is the same, endpoints included (up to the order of the two ends)."""
    shape, spacing = (70, 60, 30), (0.8, 0.9, 2.5)
    affine = grid(spacing, rotation((0.3, 0.2, 1.0), 15), origin=(10.0, -5.0, 20.0))
    mask = ellipsoid(shape, affine, centre_of(shape, affine), (19.0, 9.0, 14.0), rotation((0, 0, 1), 28))
    rng = np.random.default_rng(3)
    image = rng.normal(30, 12, shape).astype(np.float32)
    reference = measure_lesion(mask, Volume(image, affine, modality="CT"))

    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, shape[0] - 1  # i' = (I-1) - i
    flip[2, 2], flip[2, 3] = -1, shape[2] - 1
    perm = np.eye(4)[[2, 0, 1, 3]]  # i' = k, j' = i, k' = j
    for name, array, new_affine, stored in (
        ("flipped i and k", np.flip(image, (0, 2)), affine @ np.linalg.inv(flip), np.flip(mask, (0, 2))),
        ("axes permuted", image.transpose(2, 0, 1), affine @ np.linalg.inv(perm), mask.transpose(2, 0, 1)),
    ):
        other = measure_lesion(stored, Volume(array.copy(), new_affine, modality="CT"))
        assert other is not None and reference is not None
        assert other.voxels == reference.voxels, name
        assert other.volume_ml == pytest.approx(reference.volume_ml, rel=1e-12)
        assert other.surface_area_mm2 == pytest.approx(reference.surface_area_mm2, rel=1e-9)
        assert np.allclose(other.centroid_lps, reference.centroid_lps, atol=1e-9)
        assert other.intensity == reference.intensity
        for field in ("long_axis", "short_axis", "max_diameter_3d"):
            a, b = getattr(reference, field), getattr(other, field)
            assert b.length_mm == pytest.approx(a.length_mm, abs=1e-6), (name, field)
            if field != "short_axis":  # the long axis' ends are points of the border: the same ones
                ends_a = {tuple(np.round(a.start_lps, 4)), tuple(np.round(a.end_lps, 4))}
                ends_b = {tuple(np.round(b.start_lps, 4)), tuple(np.round(b.end_lps, 4))}
                assert ends_a == ends_b, (name, field)


def test_three_d_diameter_agrees_with_simpleitk_feret() -> None:
    """SimpleITK's Feret diameter (between voxel centres, no endpoints) is shorter than the
    border-to-border diameter by at most one voxel diagonal."""
    import SimpleITK as sitk

    shape, spacing = (50, 44, 24), (0.9, 0.8, 2.0)
    affine = grid(spacing)
    mask = ellipsoid(shape, affine, centre_of(shape, affine), (15.0, 8.0, 10.0), rotation((1, 1, 0), 35))
    image = sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0))
    image.SetSpacing(spacing)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputeFeretDiameterOn()
    stats.Execute(image)
    ours = measure_lesion(mask, Volume(mask.astype(np.int16), affine)).max_diameter_3d.length_mm
    assert 0 <= ours - stats.GetFeretDiameter(1) <= np.linalg.norm(spacing)


def test_acquisition_plane_and_small_lesions() -> None:
    affine = grid((0.8, 0.8, 0.8))
    vol = Volume(np.zeros((20, 20, 20), np.int16), affine, modality="MR", meta={"format": "dicom"})
    assert acquisition_axis(vol) == 2  # DICOM: the slices as stored
    sagittal_thick = Volume(np.zeros((20, 20, 20), np.int16), grid((3.0, 0.8, 0.8)))
    assert acquisition_axis(sagittal_thick) == 0
    one = np.zeros((20, 20, 20), bool)
    one[5, 6, 7] = True
    m = measure_lesion(one, vol)
    assert m.voxels == 1 and m.volume_ml == pytest.approx(0.8 ** 3 / 1000)
    assert 0 < m.long_axis.length_mm <= 0.8 * np.sqrt(2) + 1e-9  # a voxel has its size, not zero
    assert m.intensity.unit == "image units"
    # a CT without a modality in its header, which the pipeline took for Hounsfield units
    assert measure_lesion(one, vol, hounsfield=True).intensity.unit == "HU"
    assert measure_lesion(np.zeros((20, 20, 20), bool), vol) is None
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:6, 2:6, 2:4] = 1
    labels[10:15, 10:12, 10:11] = 3
    both = measure_labels(labels, vol)
    assert sorted(both) == [1, 3] and both[1].voxels == 32 and both[3].voxels == 10
    with pytest.raises(ValueError, match="mask shape"):
        measure_lesion(np.zeros((5, 5, 5), bool), vol)


def test_a_mask_kept_as_a_box_measures_as_the_whole_grid_mask() -> None:
    """measure_box (how a session keeps a lesion: a box of the grid) gives measure_lesion's numbers,
    on an oblique, flipped, anisotropic grid, with slack around the lesion in the box."""
    from msam_core.measure import measure_box

    rng = np.random.default_rng(3)
    affine = np.eye(4)
    affine[:3, :3] = rotation((1.0, 0.4, 0.2), 25.0) @ np.diag([-0.9, 0.7, 2.5])
    affine[:3, 3] = [12.0, -40.0, 7.0]
    grid = np.indices((48, 44, 16)).astype(float)
    mask = ((grid[0] - 25) / 10) ** 2 + ((grid[1] - 20) / 7) ** 2 + ((grid[2] - 8) / 4) ** 2 <= 1
    volume = Volume(rng.normal(40, 10, mask.shape).astype(np.float32), affine, modality="CT")
    whole = measure_lesion(mask, volume).to_json()
    lo = np.argwhere(mask).min(axis=0) - [3, 1, 2]
    hi = np.argwhere(mask).max(axis=0) + [2, 4, 1]
    box = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    assert measure_box(box, lo, volume).to_json() == whole
    assert measure_box(np.zeros((3, 3, 3), bool), (0, 0, 0), volume) is None
    with pytest.raises(ValueError, match="inside the image"):
        measure_box(box, (40, 0, 0), volume)


def test_the_farthest_pair_is_a_pair_at_the_largest_distance() -> None:
    """Against every pair compared (no hull), on point sets full of ties (half-voxel grids, as
    contours and marching-cubes vertices lie) and duplicates, in 2D and 3D."""
    from msam_core.measure import _farthest_pair

    rng = np.random.default_rng(0)
    for trial in range(300):
        dim = 2 + trial % 2
        m = int(rng.integers(2, 160))
        points = rng.integers(0, 7, (m, dim)).astype(float) * 0.5 * np.array([0.7, 0.7, 2.5][:dim])
        if trial % 5 == 0:
            points = np.repeat(points[: max(1, m // 4)], 4, axis=0)
        d2 = np.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1)
        i, j, d = _farthest_pair(points)
        assert d == pytest.approx(np.sqrt(d2.max()), abs=1e-12), trial
        assert np.sum((points[i] - points[j]) ** 2) == pytest.approx(d2.max(), abs=1e-12), trial


def test_the_long_axis_slice_is_the_exhaustive_searchs() -> None:
    """The RECIST axes skip slices whose bounding box cannot hold a longer chord; the result is the
    one every slice measured gives (the longest chord; of equally long ones the first slice's), on
    blobs, ellipsoids, ties and single voxels, on oblique, flipped and anisotropic grids."""
    from scipy import ndimage

    from msam_core.measure import _farthest_pair, _in_plane_basis, _slice_axes, _slice_contours

    def exhaustive_long(volume, box, axis):
        to_plane = _in_plane_basis(volume, axis)[0]
        best = None
        for s in range(box.shape[axis]):
            section = np.take(box, s, axis=axis)
            if section.any():
                xy = np.concatenate(_slice_contours(section)) @ to_plane.T
                d = _farthest_pair(xy)[2]
                if best is None or d > best[0] + 1e-9:
                    best = (d, s)
        return best

    rng = np.random.default_rng(0)
    several = 0
    for k in range(120):
        shape = tuple(int(v) for v in rng.integers(6, 26, 3))
        if k % 3 == 0:
            ii = np.indices(shape).reshape(3, -1).T
            mask = (((ii - np.asarray(shape) / 2) / (np.asarray(shape) / 2.5)) ** 2).sum(1).reshape(shape) < 1
        else:
            mask = ndimage.binary_opening(rng.random(shape) > rng.uniform(0.3, 0.7))
        if k % 10 == 0:
            mask = np.zeros(shape, bool)
            mask[3, 4, 5] = True
        if k % 10 == 5:  # the same section on every slice: all tie, the first wins
            mask = np.zeros(shape, bool)
            mask[1:5, 2:4, :] = True
        if not mask.any():
            continue
        affine = np.eye(4)
        affine[:3, :3] = (rotation(tuple(rng.normal(size=3)), float(rng.uniform(0, 60))) if k % 2 else
                          np.diag(rng.choice([-1.0, 1.0], 3))) @ np.diag(rng.uniform(0.5, 3.0, 3))
        volume = Volume(np.zeros(shape, np.int16), affine)
        for axis in range(3):
            long_axis, short_axis = _slice_axes(volume, mask, np.zeros(3, int), axis)
            length, s = exhaustive_long(volume, mask, axis)
            assert long_axis.slice_index == s and long_axis.length_mm == pytest.approx(length, abs=1e-9), (k, axis)
            assert short_axis.slice_index == s
            several += int(np.count_nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))) > 1
    assert several > 100  # lesions over several slices, where slices can be skipped


@pytest.mark.parametrize("layout", ["reverse", "shuffle", "multiframe"])
def test_a_dicom_slice_is_named_by_the_image_it_is(tmp_path, layout) -> None:
    """The RECIST axes' slice index counts slices in space; for DICOM input the axes also name
    the image that slice is (its SOP Instance UID, and frame in a multi-frame instance), found
    here from the files' own positions, whatever order the series was written in."""
    import pydicom

    from msam_core.io.load import load_volume
    from tests.unit.io.dicom_synth import make_ct_series, make_split_multiframe

    series = make_ct_series(tmp_path / "series", shape=(24, 20, 10), write_order="shuffle" if layout == "multiframe"
                            else layout)
    folder = make_split_multiframe(series, tmp_path / "mf") if layout == "multiframe" else tmp_path / "series"
    volume = load_volume(folder)
    mask = np.zeros(volume.shape, bool)
    mask[8:16, 6:14, 3] = True  # the lesion's largest section on slice 3
    mask[10:14, 8:12, 2] = mask[10:14, 8:12, 4] = True
    long_axis = measure_lesion(mask, volume).long_axis
    assert long_axis.slice_axis == 2 and long_axis.slice_index == 3
    # the image whose position lies in the axis's plane (along the slice normal), from the files
    normal = np.cross(series.affine_lps[:3, 0], series.affine_lps[:3, 1])
    normal /= np.linalg.norm(normal)
    where = float(np.dot(long_axis.start_lps, normal))
    images = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        if "PerFrameFunctionalGroupsSequence" in ds:
            for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                ipp = frame.PlanePositionSequence[0].ImagePositionPatient
                images.append((str(ds.SOPInstanceUID), n, float(np.dot(np.asarray(ipp, float), normal))))
        else:
            images.append((str(ds.SOPInstanceUID), None, float(np.dot(np.asarray(ds.ImagePositionPatient, float),
                                                                       normal))))
    uid, frame, _ = min(images, key=lambda im: abs(im[2] - where))
    assert (long_axis.slice_sop_instance_uid, long_axis.slice_frame_number) == (uid, frame)
    assert (frame is not None) == (layout == "multiframe")
    assert long_axis.to_json()["slice_sop_instance_uid"] == uid
    # not DICOM: no image to name
    plain = measure_lesion(mask, Volume(volume.array, volume.affine)).long_axis
    assert plain.slice_sop_instance_uid is None and plain.slice_frame_number is None
