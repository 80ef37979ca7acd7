"""Inputs as archives hold them: NIfTI with trailing singleton dimensions (as M-SAM's demo case is
written), MetaImage (.mha, .mhd + .raw/.zraw) checked against NIfTI of the same image in flipped
and oblique layouts, masks written back as MetaImage, and hostile MetaImage headers."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from msam_core.errors import InvalidVolume
from msam_core.io.load import load_volume
from msam_core.io.metaimage import (check_data_file_name, inflate_metaimage, join_metaimage, read_meta_header,
                                    save_mask_metaimage)
from msam_service.upload_guard import UploadLimits, check_upload
from tests.unit.pipeline.phantoms import make_affine, rotation

LIMITS = UploadLimits(max_voxels=1 << 20, max_bytes=4 << 20, max_files=10)
OBLIQUE = make_affine((0.7, 1.1, 2.9), rotation((1, -0.4, 0.3), 33.0), (-80.5, 120.25, -33.0))
#: flipped: i runs to the left, j to the posterior (as a DICOM/ITK image stored in LPS is), k to
#: the inferior; anisotropic
FLIPPED = np.array([[-0.8, 0, 0, 60.0], [0, -1.3, 0, 40.0], [0, 0, -3.0, 25.0], [0, 0, 0, 1]])
#: permuted: i along S, j along R, k along A
PERMUTED = np.array([[0, 1.2, 0, -10.0], [0, 0, 0.9, 5.0], [2.0, 0, 0, -7.0], [0, 0, 0, 1]])


def _data(shape=(9, 7, 5)) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(-900, 900, size=shape).astype(np.int16)


def write_metaimage(array: np.ndarray, affine_ras: np.ndarray, path: Path, compress: bool = False) -> Path:
    """A MetaImage of ``array`` (indexed [i, j, k]) at ``affine_ras``, its ITK geometry computed
    here from the RAS affine by hand (LPS = RAS with x and y negated): independent of the reader."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).ravel().tolist())
    image.SetOrigin([-affine_ras[0, 3], -affine_ras[1, 3], affine_ras[2, 3]])
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


# -- NIfTI with trailing singleton dimensions -------------------------------------------------

def msam_demo_style_nifti(path: Path, array: np.ndarray) -> Path:
    """A z-scored crop written the way M-SAM's demo case is: a 5-D NIfTI of shape (X, Y, Z, 1, 1),
    float32, qform and sform code 1, an LPS-identity grid (RAS diag(-1, -1, 1)), millimetres."""
    z = ((array - array.mean()) / array.std()).astype(np.float32)
    img = nib.Nifti1Image(z.reshape(*z.shape, 1, 1), np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def test_five_d_nifti_with_singleton_dimensions_reads_as_3d(tmp_path):
    array = _data((12, 10, 8)).astype(np.float32)
    path = msam_demo_style_nifti(tmp_path / "image3D.nii.gz", array)
    assert nib.load(str(path)).shape == (12, 10, 8, 1, 1)
    volume = load_volume(path)
    assert volume.shape == (12, 10, 8)
    np.testing.assert_allclose(volume.array, (array - array.mean()) / array.std(), atol=1e-5)
    np.testing.assert_array_equal(volume.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_four_d_with_one_time_point_and_scaling_reads_as_3d(tmp_path):
    img = nib.Nifti1Image(_data().reshape(9, 7, 5, 1), OBLIQUE)
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, str(tmp_path / "t1.nii.gz"))
    volume = load_volume(tmp_path / "t1.nii.gz")
    np.testing.assert_allclose(volume.array, _data() * 0.5 - 3.0)
    assert volume.array.dtype == np.float32


@pytest.mark.parametrize("shape, dimension, what", [
    ((9, 7, 5, 3), 4, "3 time points"),
    ((9, 7, 5, 1, 2), 5, "2 components"),
])
def test_real_series_refused_naming_the_dimension(tmp_path, shape, dimension, what):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), OBLIQUE), str(tmp_path / "s.nii.gz"))
    with pytest.raises(InvalidVolume) as info:
        load_volume(tmp_path / "s.nii.gz")
    message = str(info.value)
    assert f"dimension {dimension} holds {what}" in message and "slicer" in message


# -- MetaImage geometry against NIfTI ---------------------------------------------------------

@pytest.mark.parametrize("affine", [OBLIQUE, FLIPPED, PERMUTED], ids=["oblique", "flipped", "permuted"])
@pytest.mark.parametrize("form", ["mha", "mhd-raw", "mhd-zraw"])
def test_metaimage_geometry_equals_nifti_of_the_same_image(tmp_path, affine, form):
    data = _data()
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "a.nii.gz"))
    path = write_metaimage(data, affine, tmp_path / ("a.mha" if form == "mha" else "a.mhd"),
                           compress=form == "mhd-zraw")
    nifti, meta = load_volume(tmp_path / "a.nii.gz"), load_volume(path)
    assert meta.meta["format"] == "metaimage" and meta.shape == nifti.shape
    np.testing.assert_array_equal(meta.array, nifti.array)
    np.testing.assert_allclose(meta.affine, nifti.affine, atol=1e-5)
    # one bright voxel lands at the same RAS point in both (a mirrored axis would move it)
    voxel = np.array([[1, 5, 3]])
    np.testing.assert_allclose(meta.voxel_to_ras(voxel), nifti.voxel_to_ras(voxel), atol=1e-4)


def test_metaimage_from_itk_nifti_conversion_and_modality(tmp_path):
    data = _data()
    nib.save(nib.Nifti1Image(data, OBLIQUE), str(tmp_path / "a.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "a.nii.gz"))  # ITK's own NIfTI -> LPS conversion
    sitk.WriteImage(image, str(tmp_path / "a.mha"), useCompression=True)
    raw = (tmp_path / "a.mha").read_bytes()  # MetaIO's Modality field, as scanners' exports set it
    (tmp_path / "a.mha").write_bytes(raw.replace(b"NDims = 3\n", b"NDims = 3\nModality = MET_MOD_CT\n", 1))
    volume = load_volume(tmp_path / "a.mha")
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-4)
    np.testing.assert_array_equal(volume.array, data)
    assert volume.modality == "CT"


@pytest.mark.parametrize("affine", [OBLIQUE, FLIPPED], ids=["oblique", "flipped"])
def test_mask_written_as_metaimage_keeps_the_input_geometry(tmp_path, affine):
    data = _data()
    source = load_volume(write_metaimage(data, affine, tmp_path / "in.mha"))
    mask = (data > 300).astype(np.uint8)
    save_mask_metaimage(mask, source, tmp_path / "mask.mha")
    back, src_itk, mask_itk = (load_volume(tmp_path / "mask.mha"), sitk.ReadImage(str(tmp_path / "in.mha")),
                               sitk.ReadImage(str(tmp_path / "mask.mha")))
    np.testing.assert_array_equal(back.array, mask)
    assert mask_itk.GetSpacing() == src_itk.GetSpacing() and mask_itk.GetOrigin() == src_itk.GetOrigin()
    assert mask_itk.GetDirection() == src_itk.GetDirection()  # bit for bit, as read
    # a mask of a NIfTI input, written as MetaImage, lands on the NIfTI's grid
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "in.nii.gz"))
    save_mask_metaimage(mask, load_volume(tmp_path / "in.nii.gz"), tmp_path / "mask2.mhd")
    assert (tmp_path / "mask2.zraw").is_file()
    np.testing.assert_allclose(load_volume(tmp_path / "mask2.mhd").affine, affine, atol=1e-5)


# -- hostile headers ----------------------------------------------------------------------------

HEADER = (b"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
          b"TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = 1 1 1\n")


def _mha(tmp: Path, name: str, dims: str = "4 4 4", data_file: str = "LOCAL", compressed: bool = False,
         data: bytes = b"") -> Path:
    extra = b"CompressedData = True\n" if compressed else b""
    path = tmp / name
    path.write_bytes(HEADER + extra + f"DimSize = {dims}\nElementType = MET_SHORT\n"
                     f"ElementDataFile = {data_file}\n".encode() + data)
    return path


@pytest.mark.parametrize("data_file, fragment", [
    ("../../etc/passwd", "outside the upload"),
    ("/etc/passwd", "outside the upload"),
    ("C:\\Windows\\win.ini", "outside the upload"),
    ("LIST", "several files"),
    ("slice%03d.raw 1 10 1", "several files"),
])
def test_hostile_data_file_names_refused(tmp_path, data_file, fragment):
    header = _mha(tmp_path, "h.mhd", data_file=data_file)
    with pytest.raises(InvalidVolume, match=fragment):
        check_data_file_name(read_meta_header(header))
    raw = tmp_path / "passwd"
    raw.write_bytes(b"\0" * 128)
    with pytest.raises(InvalidVolume, match=fragment):
        join_metaimage([("h.mhd", header), ("passwd", raw)], tmp_path / "joined.mha")


def test_pair_joined_into_one_mha_and_missing_data_file_refused(tmp_path):
    data = _data()
    write_metaimage(data, FLIPPED, tmp_path / "case.mhd", compress=True)
    joined = join_metaimage([("case.mhd", tmp_path / "case.mhd"), ("case.zraw", tmp_path / "case.zraw")],
                            tmp_path / "image.mha")
    assert read_meta_header(joined).local
    limits_checked = check_upload(joined, tmp_path, LIMITS)  # inflated within the declared size
    assert not read_meta_header(limits_checked).compressed
    np.testing.assert_array_equal(load_volume(limits_checked).array, data)
    np.testing.assert_allclose(load_volume(limits_checked).affine, FLIPPED, atol=1e-5)
    with pytest.raises(InvalidVolume, match="not in the upload"):
        join_metaimage([("case.mhd", tmp_path / "case.mhd"), ("other.zraw", tmp_path / "case.zraw")],
                       tmp_path / "x.mha")


def test_single_mha_pointing_at_a_server_file_refused_before_decoding(tmp_path):
    path = _mha(tmp_path, "image.mha", data_file="passwd")
    (tmp_path / "passwd").write_bytes(b"\0" * 128)  # would decode if the header were followed
    with pytest.raises(InvalidVolume, match="separate data file"):
        check_upload(path, tmp_path, LIMITS)


def test_compressed_bomb_expands_only_as_far_as_declared(tmp_path):
    bomb = zlib.compress(b"\0" * (64 << 20), 9)  # 64 MB of zeros for a header declaring 128 bytes
    path = _mha(tmp_path, "image.mha", compressed=True, data=bomb)
    with pytest.raises(InvalidVolume, match="holds more than the 128 bytes"):
        inflate_metaimage(path, tmp_path / "raw.mha", LIMITS.max_bytes)
    short = _mha(tmp_path, "short.mha", compressed=True, data=zlib.compress(b"\0" * 100))
    with pytest.raises(InvalidVolume, match="ends after 100 of the 128 bytes"):
        inflate_metaimage(short, tmp_path / "raw2.mha", LIMITS.max_bytes)


def test_declared_sizes_checked_before_decoding(tmp_path):
    path = _mha(tmp_path, "big.mha", dims="100000 100000 100000", compressed=True, data=zlib.compress(b"\0" * 64))
    with pytest.raises(InvalidVolume, match="MSAM_MAX_VOXELS"):
        check_upload(path, tmp_path, LIMITS)
    with pytest.raises(InvalidVolume, match="MSAM_MAX_DECOMPRESSED_MB"):
        inflate_metaimage(path, tmp_path / "raw.mha", LIMITS.max_bytes)
