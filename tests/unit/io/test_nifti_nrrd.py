"""NIfTI and NRRD readers, the load_volume dispatcher, and mask writing (real files on disk).

Readers are cross-checked against SimpleITK, an independent implementation that reports LPS.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from msam_core.errors import InvalidVolume
from msam_core.io.load import load_volume
from msam_core.io.nifti import save_mask_nifti
from msam_core.io.volume import LPS_TO_RAS
from tests.unit.pipeline.phantoms import make_affine, rotation

OBLIQUE = make_affine((0.7, 1.1, 2.9), rotation((1, -0.4, 0.3), 33.0), (-80.5, 120.25, -33.0))


def _sitk_affine_ras(path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine


def _data(shape=(7, 5, 4), dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) * 3 - 20).astype(dtype)


def test_nifti_reader_matches_simpleitk(tmp_path):
    data = _data()
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(data, OBLIQUE), str(path))
    volume = load_volume(path)
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(volume.affine, _sitk_affine_ras(path), atol=1e-4)
    np.testing.assert_array_equal(volume.array, data)
    assert volume.meta["format"] == "nifti" and volume.modality is None


def test_nifti_qform_only_and_sform_precedence(tmp_path):
    data = _data()
    qonly = nib.Nifti1Image(data, None)
    qonly.set_qform(OBLIQUE, code=1)
    qonly.set_sform(None, code=0)
    nib.save(qonly, str(tmp_path / "q.nii"))
    np.testing.assert_allclose(load_volume(tmp_path / "q.nii").affine, OBLIQUE, atol=1e-4)

    both = nib.Nifti1Image(data, None)
    other = make_affine((2.0, 2.0, 2.0), None, (1.0, 2.0, 3.0))
    both.set_qform(other, code=1)
    both.set_sform(OBLIQUE, code=2)
    nib.save(both, str(tmp_path / "s.nii.gz"))
    np.testing.assert_allclose(load_volume(tmp_path / "s.nii.gz").affine, OBLIQUE, atol=1e-5)


def test_a_nifti_without_orientation_is_refused(tmp_path):
    """Neither qform nor sform: nibabel would fall back to an orientation of its own."""
    bare = nib.Nifti1Image(_data(), None)
    assert bare.header["qform_code"] == bare.header["sform_code"] == 0
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    with pytest.raises(InvalidVolume, match="sets neither a qform nor an sform .*orientation in the patient is unknown"):
        load_volume(tmp_path / "bare.nii.gz")


def test_mask_round_trip_keeps_grid_and_header_geometry_exactly(tmp_path):
    img = nib.Nifti1Image(_data((9, 8, 7), np.float32), None)
    img.set_qform(OBLIQUE, code=1)
    img.set_sform(OBLIQUE @ np.diag([1, 1, 1, 1.0]), code=4)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    volume = load_volume(tmp_path / "in.nii.gz")
    mask = np.zeros(volume.shape, np.uint8)
    mask[2:5, 3:6, 1:4] = 1
    mask[6, 6, 6] = 2
    out = save_mask_nifti(mask, volume, tmp_path / "mask.nii.gz")
    back, src = nib.load(str(out)), nib.load(str(tmp_path / "in.nii.gz"))
    assert np.array_equal(back.affine, src.affine)
    assert np.array_equal(back.get_qform(), src.get_qform())
    for field in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "qoffset_x"):
        assert np.array_equal(back.header[field], src.header[field]), field
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    assert np.array_equal(load_volume(out).affine, volume.affine)


def test_mask_for_non_nifti_input_gets_its_affine(tmp_path):
    data = _data((6, 6, 6))
    lps = LPS_TO_RAS @ OBLIQUE
    nrrd.write(str(tmp_path / "a.nrrd"), data, {"space": "left-posterior-superior",
                                                 "space directions": lps[:3, :3].T,
                                                 "space origin": lps[:3, 3]}, index_order="F")
    volume = load_volume(tmp_path / "a.nrrd")
    out = save_mask_nifti(np.ones(volume.shape, np.uint8), volume, tmp_path / "m.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).affine, OBLIQUE, atol=1e-4)
    np.testing.assert_allclose(_sitk_affine_ras(out), OBLIQUE, atol=1e-3)


@pytest.mark.parametrize("space, signs", [("left-posterior-superior", (-1, -1, 1)),
                                          ("right-anterior-superior", (1, 1, 1)),
                                          ("left-anterior-superior", (-1, 1, 1))])
def test_nrrd_spaces_map_to_ras(tmp_path, space, signs):
    data = _data()
    declared = np.diag([*signs, 1.0]) @ OBLIQUE  # OBLIQUE expressed in the declared frame
    header = {"space": space, "space directions": declared[:3, :3].T, "space origin": declared[:3, 3]}
    nrrd.write(str(tmp_path / "a.nrrd"), data, header, index_order="F")
    volume = load_volume(tmp_path / "a.nrrd")
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-9)
    np.testing.assert_array_equal(volume.array, data)
    if space != "left-anterior-superior":  # SimpleITK reads LPS and RAS NRRDs
        np.testing.assert_allclose(volume.affine, _sitk_affine_ras(tmp_path / "a.nrrd"), atol=1e-6)


def test_nrrd_written_by_simpleitk(tmp_path):
    data = _data((5, 6, 7), np.float32)  # [i, j, k]
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    lps = LPS_TO_RAS @ OBLIQUE
    image.SetSpacing(np.linalg.norm(lps[:3, :3], axis=0).tolist())
    image.SetDirection((lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(image, str(tmp_path / "s.nrrd"))
    volume = load_volume(tmp_path / "s.nrrd")
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-6)
    np.testing.assert_array_equal(volume.array, data)


def test_nrrd_without_orientation_is_refused(tmp_path):
    nrrd.write(str(tmp_path / "a.nrrd"), _data(), {"spacings": [1.0, 1.0, 1.0]})
    with pytest.raises(InvalidVolume, match="no 'space'"):
        load_volume(tmp_path / "a.nrrd")


def test_load_volume_user_errors(tmp_path):
    with pytest.raises(InvalidVolume, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(InvalidVolume, match="unknown image format"):
        load_volume(tmp_path / "a.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(InvalidVolume, match="cannot read broken.nii.gz"):
        load_volume(tmp_path / "broken.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), str(tmp_path / "t.nii"))
    with pytest.raises(InvalidVolume, match="3D"):
        load_volume(tmp_path / "t.nii")


def test_load_volume_reads_a_dicom_folder(tmp_path):
    from tests.unit.io.dicom_synth import make_ct_series

    make_ct_series(tmp_path / "ct")
    volume = load_volume(tmp_path / "ct")
    assert volume.meta["format"] == "dicom" and volume.modality == "CT"


def test_mask_for_a_sheared_grid_keeps_the_sform_only(tmp_path):
    from msam_core.io.volume import Volume

    sheared = np.array([[1.0, 0.3, 0.0, 5.0], [0.0, 1.0, 0.0, 3.0], [0.0, 0.2, 2.0, 1.0], [0, 0, 0, 1.0]])
    volume = Volume(np.zeros((5, 6, 7), np.int16), sheared)
    out = nib.load(str(save_mask_nifti(np.ones(volume.shape, np.uint8), volume, tmp_path / "m.nii.gz")))
    assert out.header["qform_code"] == 0 and out.header["sform_code"] == 2
    np.testing.assert_allclose(out.affine, sheared, atol=1e-6)


def test_non_finite_voxels_become_the_background_and_an_image_of_none_is_refused(tmp_path: Path) -> None:
    """NaN outside the field of view (as some tools write it) is the image's lowest value, so a
    crop's normalisation stays finite; an image with no finite voxel is a clear refusal."""
    from msam_core.io.load import load_volume
    from msam_core.pipeline.preprocess import CropGrid, VolumeSampler

    array = np.full((20, 20, 10), -1000.0, np.float32)
    array[5:15, 5:15, 2:8] = 40.0
    array[:3] = np.nan
    array[-1, -1, -1] = np.inf
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "nan.nii.gz"))
    volume = load_volume(tmp_path / "nan.nii.gz")
    assert np.isfinite(volume.array).all() and volume.meta["non_finite_voxels"] == 3 * 20 * 10 + 1
    assert volume.array[0, 0, 0] == -1000.0 and volume.array[10, 10, 5] == 40.0
    crop = VolumeSampler(volume).crop(CropGrid.centred(volume.voxel_to_ras(np.array([[10.0, 10.0, 5.0]]))[0]))
    assert torch.isfinite(crop).all()
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(tmp_path / "all.nii.gz"))
    with pytest.raises(InvalidVolume, match="every voxel is NaN or infinite"):
        load_volume(tmp_path / "all.nii.gz")
