"""The same physical phantom, stored in many ways, gives the same mask in physical space.

Every variant is written to disk (NIfTI or NRRD) and read back through ``load_volume``; the
network is replaced by :class:`RegionGrowDouble` so that the comparison tests geometry only.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from msam_core.io.load import load_volume
from msam_core.io.volume import LPS_TO_RAS, Volume
from msam_core.pipeline.prompts import Point
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.segmenter import DictEmbeddingCache, Segmenter
from tests.unit.pipeline.phantoms import (RegionGrowDouble, centred_affine, dice, rotation,
                                          sample_mask_at, sphere_truth, spheres_image,
                                          voxel_centres_ras)

CENTER = np.array([10.3, -20.2, 30.1])  # RAS mm, off-lattice on purpose
RADIUS = 22.0
SHAPE = (72, 72, 72)
IMAGE_CENTER = CENTER + np.array([4.0, -3.0, 2.5])


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _save_nrrd_lps(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    lps = LPS_TO_RAS @ affine  # RAS affine -> LPS affine
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
              "space origin": lps[:3, 3], "kinds": ["domain"] * 3}
    nrrd.write(str(path), array, header, index_order="F")
    return path


def _segment(volume: Volume, point: Point) -> np.ndarray:
    seg = Segmenter(RegionGrowDouble(), PipelineOptions(), cache=DictEmbeddingCache())
    return seg.segment(volume, points=[point]).labels


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Canonical storage: 1 mm isotropic, axes along R, A, S."""
    affine = centred_affine(SHAPE, (1.0, 1.0, 1.0), None, IMAGE_CENTER)
    image = spheres_image(SHAPE, affine, [(CENTER, RADIUS)])
    path = _save_nifti(image, affine, tmp_path_factory.mktemp("ref") / "ref.nii.gz")
    volume = load_volume(path)
    labels = _segment(volume, Point(tuple(CENTER), space="RAS"))
    return volume, image, labels


def test_reference_mask_lands_on_the_sphere(reference):
    volume, _, labels = reference
    assert set(np.unique(labels)) == {0, 1}
    assert dice(labels, sphere_truth(volume.shape, volume.affine, CENTER, RADIUS)) > 0.95


@pytest.mark.parametrize("flip", [(0,), (1,), (2,), (0, 2), (0, 1, 2)])
def test_flipped_storage_gives_the_identical_mask(reference, tmp_path, flip):
    volume, image, labels = reference
    array = np.flip(image, axis=flip)
    affine = volume.affine.copy()
    for axis in flip:  # index i -> n-1-i along a flipped axis
        affine[:3, 3] += affine[:3, axis] * (SHAPE[axis] - 1)
        affine[:3, axis] *= -1
    stored = load_volume(_save_nifti(np.ascontiguousarray(array), affine, tmp_path / "f.nii.gz"))
    out = _segment(stored, Point(tuple(CENTER), space="RAS"))
    assert np.array_equal(np.flip(out, axis=flip), labels)


@pytest.mark.parametrize("perm", [(1, 0, 2), (2, 0, 1), (2, 1, 0)])
def test_permuted_storage_gives_the_identical_mask(reference, tmp_path, perm):
    volume, image, labels = reference
    array = np.ascontiguousarray(image.transpose(perm))
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, list(perm)]
    stored = load_volume(_save_nifti(array, affine, tmp_path / "p.nii.gz"))
    out = _segment(stored, Point(tuple(CENTER), space="RAS"))
    assert np.array_equal(out, labels.transpose(perm))


@pytest.mark.parametrize(
    "name, spacing, rot, fmt",
    [
        ("anisotropic", (0.7, 0.9, 2.5), None, "nifti"),
        ("oblique", (1.0, 1.1, 1.3), rotation((1, 1, 0), 25.0), "nifti"),
        ("oblique-lps-nrrd", (0.8, 0.8, 2.0), rotation((0.2, -1, 0.5), 40.0), "nrrd"),
        ("flipped-anisotropic-nrrd", (-0.9, 1.2, -3.0), None, "nrrd"),
        ("sheared", (1.0, 1.0, 1.5), np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.15, 1.0]]), "nifti"),
    ],
)
def test_resampled_storage_gives_the_same_mask_in_physical_space(reference, tmp_path, name, spacing, rot, fmt):
    volume, _, ref_labels = reference
    extent = 72.0
    shape = tuple(int(np.ceil(extent / abs(s))) for s in spacing)
    affine = centred_affine(shape, spacing, rot, IMAGE_CENTER)
    image = spheres_image(shape, affine, [(CENTER, RADIUS)])
    if fmt == "nifti":
        path = _save_nifti(image, affine, tmp_path / f"{name}.nii.gz")
    else:
        path = _save_nrrd_lps(image, affine, tmp_path / f"{name}.nrrd")
    stored = load_volume(path)
    np.testing.assert_allclose(stored.affine, affine, atol=1e-4)
    out = _segment(stored, Point(tuple(CENTER), space="RAS"))
    # on its own grid, the mask is the sphere
    assert dice(out, sphere_truth(shape, affine, CENTER, RADIUS)) > 0.93
    # and seen from the reference grid's voxel centres, it is the reference mask
    seen = sample_mask_at(out, affine, voxel_centres_ras(volume.shape, volume.affine))
    inside = np.linalg.norm(voxel_centres_ras(volume.shape, volume.affine) - IMAGE_CENTER, axis=-1) < 30
    assert dice(seen & inside, (ref_labels > 0) & inside) > 0.93


def test_prompts_in_voxel_lps_and_ras_agree(tmp_path):
    spacing, rot = (0.9, 1.2, 2.0), rotation((0, 0.3, 1), 30.0)
    shape = (80, 60, 36)
    affine = centred_affine(shape, spacing, rot, IMAGE_CENTER)
    image = spheres_image(shape, affine, [(CENTER, RADIUS)])
    volume = load_volume(_save_nifti(image, affine, tmp_path / "v.nii.gz"))
    voxel = volume.ras_to_voxel(CENTER)[0]
    lps = CENTER * np.array([-1.0, -1.0, 1.0])
    masks = [
        _segment(volume, Point(tuple(CENTER), space="RAS")),
        _segment(volume, Point(tuple(lps), space="LPS")),
        _segment(volume, Point(tuple(voxel), space="voxel")),
    ]
    assert dice(masks[0], sphere_truth(shape, affine, CENTER, RADIUS)) > 0.9
    for other in masks[1:]:
        assert dice(masks[0], other) > 0.999


def test_voxel_prompt_follows_the_array_not_the_world(tmp_path):
    """Two spheres: a click in voxel space picks the one at those array indices, whatever the
    orientation of the storage."""
    a, b = CENTER + [-18.0, 0, 0], CENTER + [18.0, 0, 0]
    affine = centred_affine(SHAPE, (-1.0, 1.0, 1.0), None, IMAGE_CENTER)  # i runs towards Left
    image = spheres_image(SHAPE, affine, [(a, 10.0), (b, 10.0)])
    volume = load_volume(_save_nifti(image, affine, tmp_path / "two.nii.gz"))
    vox_b = np.rint(volume.ras_to_voxel(b)[0])
    labels = _segment(volume, Point(tuple(vox_b), space="voxel"))
    assert dice(labels, sphere_truth(SHAPE, affine, b, 10.0)) > 0.8  # 6 mm logits on a 10 mm sphere
    assert not np.any(labels & sphere_truth(SHAPE, affine, a, 10.0))
