"""msam_core.io.dicom.read_series on real synthetic DICOM files (no mocks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from msam_core.errors import InvalidVolume
from msam_core.io.dicom import DicomSource, list_series, read_series, volume_affine_lps
from msam_core.io.volume import LPS_TO_RAS
from tests.unit.io.dicom_synth import (
    UID_ROOT,
    lps_of,
    make_ct_series,
    make_legacy_multiframe,
    make_split_multiframe,
    rotation,
)

OBLIQUE = rotation((1.0, 2.0, 0.5), 27.0)

GEOMETRIES = {
    "axial": {},
    "axial_reversed_files": {"write_order": "reverse"},
    "axial_shuffled_files": {"write_order": "shuffle"},
    "rows_and_columns_flipped": {"row_dir": (-1.0, 0.0, 0.0), "col_dir": (0.0, -1.0, 0.0)},
    "feet_first_normal": {"row_dir": (1.0, 0.0, 0.0), "col_dir": (0.0, -1.0, 0.0), "write_order": "reverse"},
    "sagittal": {"row_dir": (0.0, 1.0, 0.0), "col_dir": (0.0, 0.0, -1.0)},
    "coronal": {"row_dir": (1.0, 0.0, 0.0), "col_dir": (0.0, 0.0, -1.0), "write_order": "shuffle"},
    "oblique_anisotropic": {
        "row_dir": tuple(OBLIQUE[:, 0]),
        "col_dir": tuple(OBLIQUE[:, 1]),
        "spacing": (0.6, 1.3, 3.1),
        "write_order": "shuffle",
    },
}


def _check(volume, series) -> None:
    assert volume.array.shape == series.truth.shape
    np.testing.assert_array_equal(volume.array, series.truth)
    np.testing.assert_allclose(volume_affine_lps(volume), series.affine_lps, atol=1e-4)
    # RAS = LPS with x and y negated, voxel by voxel, at the corners of the grid
    corners = np.array([[0, 0, 0], [volume.shape[0] - 1, 0, 0], [0, volume.shape[1] - 1, 0], np.array(volume.shape) - 1])
    expected_ras = lps_of(series.affine_lps, corners) * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(volume.voxel_to_ras(corners), expected_ras, atol=1e-4)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_single_frame_geometries(tmp_path: Path, name: str) -> None:
    series = make_ct_series(tmp_path / "ct", **GEOMETRIES[name])
    volume = read_series(tmp_path / "ct")
    _check(volume, series)
    assert volume.modality == "CT"
    assert volume.array.dtype == np.int16
    meta = volume.meta
    assert meta["format"] == "dicom"
    assert meta["series_instance_uid"] == series.series_uid
    assert meta["study_instance_uid"] == series.study_uid
    assert meta["frame_of_reference_uid"] == series.for_uid
    # SOP instance UIDs are in slice order (along the normal), whatever the file order
    by_uid = {ds.SOPInstanceUID: ds for ds in series.datasets}
    normal = np.cross(series.affine_lps[:3, 0], series.affine_lps[:3, 1])
    depths = [np.asarray(by_uid[u].ImagePositionPatient, dtype=float) @ normal for u in meta["sop_instance_uids"]]
    assert np.all(np.diff(depths) > 0)
    assert isinstance(meta["dicom_source"], DicomSource)
    assert "Synthetic" not in repr(meta["dicom_source"])  # the repr carries no patient data


def test_known_affine_for_a_plain_axial_series(tmp_path: Path) -> None:
    """Hand-written expectation: HFS axial, rows along +x(L), columns along +y(P)."""
    make_ct_series(tmp_path / "ct", spacing=(0.8, 0.7, 2.5), origin=(-10.0, -20.0, 30.0))
    volume = read_series(tmp_path / "ct")
    expected = np.array(
        [
            [-0.8, 0.0, 0.0, 10.0],  # i runs to the patient's left  = -R
            [0.0, -0.7, 0.0, 20.0],  # j runs to posterior           = -A
            [0.0, 0.0, 2.5, 30.0],  # k runs superior
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(volume.affine, expected, atol=1e-6)
    np.testing.assert_allclose(volume.spacing, [0.8, 0.7, 2.5], atol=1e-6)


def test_rescale_slope_gives_float_values(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct", slope=0.5, intercept=-100.25)
    volume = read_series(tmp_path / "ct")
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, series.truth, atol=1e-3)


@pytest.mark.parametrize("write_order", ["forward", "reverse"])
def test_legacy_converted_multiframe(tmp_path: Path, write_order: str) -> None:
    series = make_ct_series(
        tmp_path / "ct", row_dir=(-1.0, 0.0, 0.0), col_dir=(0.0, 0.0, -1.0), write_order=write_order
    )
    mf = make_legacy_multiframe(series, tmp_path / "mf.dcm")
    volume = read_series(mf)
    _check(volume, series)
    frames = volume.meta["frame_numbers"]
    assert sorted(frames) == list(range(1, len(frames) + 1))
    assert volume.meta["dicom_source"].multiframe


@pytest.mark.parametrize(
    "sop_class",
    ["1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4.1"],
    ids=["enhanced-ct", "enhanced-mr"],
)
def test_enhanced_multiframe_sop_classes(tmp_path: Path, sop_class: str) -> None:
    """Enhanced CT/MR share the functional-group layout of Legacy Converted Enhanced objects; no
    tool here writes a full Enhanced object, so the same frames are labelled with those SOP
    classes. This shows the reader places them by their functional groups, not by SOP class."""
    series = make_ct_series(tmp_path / "ct", row_dir=(0.0, 1.0, 0.0), col_dir=(0.0, 0.0, -1.0), write_order="reverse")
    mf = make_legacy_multiframe(series, tmp_path / "mf.dcm")
    ds = pydicom.dcmread(mf)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(mf)
    volume = read_series(mf)
    _check(volume, series)
    assert volume.meta["sop_class_uid"] == sop_class


@pytest.mark.parametrize(
    ("transfer_syntax", "shape"),
    [
        (RLELossless, (20, 16, 6)),
        (JPEGLSLossless, (20, 16, 6)),
        (JPEG2000Lossless, (64, 48, 4)),
        (JPEGLosslessSV1, (20, 16, 6)),
    ],
    ids=["rle", "jpeg-ls", "jpeg2000", "jpeg-lossless-sv1"],
)
def test_compressed_transfer_syntaxes(tmp_path: Path, transfer_syntax: str, shape: tuple[int, int, int]) -> None:
    series = make_ct_series(tmp_path / "ct", transfer_syntax=transfer_syntax, shape=shape, write_order="reverse")
    assert pydicom.dcmread(series.paths[0]).file_meta.TransferSyntaxUID == transfer_syntax
    volume = read_series(tmp_path / "ct")
    _check(volume, series)
    assert volume.meta["transfer_syntax_uids"] == [transfer_syntax]


def test_inputs_list_zip_and_nested_folder(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "nested" / "a" / "b", write_order="shuffle")
    _check(read_series(tmp_path / "nested"), series)
    _check(read_series(list(reversed(series.paths))), series)
    archive = shutil.make_archive(str(tmp_path / "upload"), "zip", tmp_path / "nested")
    _check(read_series(archive), series)
    (tmp_path / "nested" / "README.txt").write_text("not dicom")
    _check(read_series(tmp_path / "nested"), series)


def test_localizer_in_the_series_is_skipped(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct")
    loc = make_ct_series(
        tmp_path / "tmp", shape=(20, 16, 1), row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 0.0, -1.0),
        series_uid=series.series_uid, for_uid=series.for_uid, study_uid=series.study_uid,
    )
    ds = pydicom.dcmread(loc.paths[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "ct" / "localizer.dcm")
    _check(read_series(tmp_path / "ct"), series)


def test_a_file_sent_twice_is_read_once_and_a_conflicting_copy_is_refused(tmp_path: Path) -> None:
    """The same image twice (the same bytes, or re-encoded with the same pixels) counts once, in
    either order; a copy with the same SOPInstanceUID and other pixels would decide an image by
    file order, so the series is refused."""
    series = make_ct_series(tmp_path / "ct")
    ds = pydicom.dcmread(series.paths[4])
    shutil.copy(series.paths[4], tmp_path / "ct" / "copy.dcm")
    rewritten = pydicom.dcmread(series.paths[4])
    rewritten.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # other bytes, the same pixels
    rewritten.save_as(tmp_path / "ct" / "aaa-rewritten.dcm", implicit_vr=True, little_endian=True)
    _check(read_series(tmp_path / "ct"), series)
    _check(read_series([tmp_path / "ct" / "aaa-rewritten.dcm", *series.paths]), series)
    changed = ds.pixel_array.copy()
    changed[:] = 3000
    ds.PixelData = changed.tobytes()
    ds.save_as(tmp_path / "conflict.dcm")
    for order in ([tmp_path / "conflict.dcm", *series.paths], [*series.paths, tmp_path / "conflict.dcm"]):
        with pytest.raises(InvalidVolume, match="same SOPInstanceUID with different pixel data"):
            read_series(order)


# ---------------------------------------------------------------------------------------------
# refusals


def test_gantry_tilt_is_refused(tmp_path: Path) -> None:
    make_ct_series(tmp_path / "ct", gantry_shift_mm=0.5)
    with pytest.raises(InvalidVolume, match="gantry tilt"):
        read_series(tmp_path / "ct")


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    make_ct_series(tmp_path / "ct", drop_slices=(4,), write_order="shuffle")
    with pytest.raises(InvalidVolume, match=r"missing .*about 1 missing slice"):
        read_series(tmp_path / "ct")


def test_uneven_spacing_is_refused(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct")
    ds = pydicom.dcmread(series.paths[3])
    pos = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.7]
    ds.save_as(series.paths[3])
    with pytest.raises(InvalidVolume, match="uneven"):
        read_series(tmp_path / "ct")


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct")
    ds = pydicom.dcmread(series.paths[2])
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "ct" / "dup.dcm")
    with pytest.raises(InvalidVolume, match="share a position"):
        read_series(tmp_path / "ct")


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct")
    ds = pydicom.dcmread(series.paths[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(series.paths[0])
    with pytest.raises(InvalidVolume, match="orientations"):
        read_series(tmp_path / "ct")


def test_several_series_need_a_choice(tmp_path: Path) -> None:
    a = make_ct_series(tmp_path / "up" / "a", series_description="ABDOMEN 5mm")
    b = make_ct_series(tmp_path / "up" / "b", shape=(20, 16, 7), series_description="CHEST 1mm", seed=3)
    with pytest.raises(InvalidVolume) as err:
        read_series(tmp_path / "up")
    message = str(err.value)
    for text in (a.series_uid, b.series_uid, "CT", "10 image(s)", "7 image(s)"):
        assert text in message
    assert "Synthetic" not in message  # no patient name in the message
    assert "ABDOMEN" not in message and "CHEST" not in message  # nor free text from the source
    _check(read_series(tmp_path / "up", series_uid=b.series_uid), b)
    infos = list_series(tmp_path / "up")
    assert [i.series_instance_uid for i in infos] == [a.series_uid, b.series_uid]
    with pytest.raises(InvalidVolume, match="not among the image series"):
        read_series(tmp_path / "up", series_uid="1.2.3.4")


def _write_sr(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.StudyInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.save_as(path, enforce_file_format=True)


def test_non_image_objects_are_refused(tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    _write_sr(tmp_path / "up" / "report.dcm")
    (tmp_path / "up" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidVolume, match=r"no DICOM image series found \(found: 1 Basic Text SR Storage, 1 not DICOM\)"):
        read_series(tmp_path / "up")


def test_non_image_objects_beside_a_series_are_ignored(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "up")
    _write_sr(tmp_path / "up" / "report.dcm")
    _check(read_series(tmp_path / "up"), series)


def test_image_without_pixel_data_is_refused(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct")
    ds = pydicom.dcmread(series.paths[5])
    del ds.PixelData
    ds.save_as(series.paths[5])
    with pytest.raises(InvalidVolume, match="has no pixel data"):
        read_series(tmp_path / "ct")


def test_missing_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidVolume, match="no such file"):
        read_series(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidVolume, match="no DICOM image series"):
        read_series(tmp_path / "empty")


def test_lps_to_ras_is_its_own_inverse() -> None:
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


def test_slice_shifted_in_plane_is_refused(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct")
    ds = pydicom.dcmread(series.paths[4])
    pos = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [pos[0] + 0.3, pos[1], pos[2]]
    ds.save_as(series.paths[4])
    with pytest.raises(InvalidVolume, match="shifted in-plane"):
        read_series(tmp_path / "ct")


def test_duplicate_files_are_read_once(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct")
    shutil.copy(series.paths[3], tmp_path / "ct" / "copy_of_img.dcm")
    _check(read_series(tmp_path / "ct"), series)


def test_multiframe_per_frame_rescale(tmp_path: Path) -> None:
    """Enhanced objects may rescale each frame differently (Pixel Value Transformation per frame)."""
    series = make_ct_series(tmp_path / "ct", write_order="reverse")
    mf_path = make_legacy_multiframe(series, tmp_path / "mf.dcm")
    mf = pydicom.dcmread(mf_path)
    del mf.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for f, group in enumerate(mf.PerFrameFunctionalGroupsSequence):
        pvt = Dataset()
        pvt.RescaleIntercept = str(-1024 + 10 * f)
        pvt.RescaleSlope = "1"
        pvt.RescaleType = "HU"
        group.PixelValueTransformationSequence = [pvt]
    mf.save_as(mf_path)
    volume = read_series(mf_path)
    offsets = np.array([10 * (n - 1) for n in volume.meta["frame_numbers"]], dtype=np.float64)
    np.testing.assert_array_equal(volume.array, series.truth + offsets[None, None, :])


def test_series_split_over_several_multiframe_instances(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct", shape=(20, 16, 8), write_order="shuffle")
    volume = read_series(make_split_multiframe(series, tmp_path / "mf"))
    _check(volume, series)
    assert len(set(volume.meta["sop_instance_uids"])) == 2
