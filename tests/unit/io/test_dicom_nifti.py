"""DICOM input, NIfTI output: the reconstructed grid with a correct RAS affine.

Cross-checked against an independent DICOM reader (SimpleITK/GDCM, which works in LPS).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from msam_core.io.dicom import read_series, volume_affine_lps
from tests.unit.io.dicom_synth import make_ct_series, rotation, sphere_mask

OBLIQUE = rotation((1.0, 0.2, -0.4), 21.0)
CASES = {
    "axial_reversed": {"write_order": "reverse"},
    "flipped_rows_columns": {"row_dir": (-1.0, 0.0, 0.0), "col_dir": (0.0, -1.0, 0.0), "write_order": "shuffle"},
    "oblique_anisotropic": {
        "row_dir": tuple(OBLIQUE[:, 0]),
        "col_dir": tuple(OBLIQUE[:, 1]),
        "spacing": (0.6, 1.3, 3.1),
        "write_order": "shuffle",
    },
}


def _sitk_affine_lps(image: sitk.Image) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


@pytest.mark.parametrize("name", list(CASES))
def test_reader_agrees_with_simpleitk(tmp_path: Path, name: str) -> None:
    make_ct_series(tmp_path / "ct", **CASES[name])
    volume = read_series(tmp_path / "ct")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    image = reader.Execute()
    np.testing.assert_allclose(volume_affine_lps(volume), _sitk_affine_lps(image), atol=1e-4)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))


@pytest.mark.parametrize("name", list(CASES))
def test_nifti_mask_for_dicom_input(tmp_path: Path, name: str) -> None:
    nifti = pytest.importorskip("msam_core.io.nifti")
    series = make_ct_series(tmp_path / "ct", **CASES[name])
    volume = read_series(tmp_path / "ct")
    centre_lps = series.affine_lps[:3, :3] @ np.array([5.2, 10.7, 6.1]) + series.affine_lps[:3, 3]
    mask = sphere_mask(volume.shape, series.affine_lps, centre_lps, radius=3.5).astype(np.uint8)
    path = nifti.save_mask_nifti(mask, volume, tmp_path / "mask.nii.gz")

    img = nib.load(path)
    np.testing.assert_allclose(img.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    world_ras = nib.affines.apply_affine(img.affine, np.argwhere(np.asarray(img.dataobj) > 0)).mean(axis=0)
    expected_ras = centre_lps * np.array([-1.0, -1.0, 1.0])
    voxel_diag = float(np.linalg.norm(volume.spacing))
    assert np.linalg.norm(world_ras - expected_ras) < 0.25 * voxel_diag

    # SimpleITK (LPS) puts the NIfTI mask exactly on the DICOM grid it read itself
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    ct = reader.Execute()
    mask_img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(_sitk_affine_lps(mask_img), _sitk_affine_lps(ct), atol=1e-3)
