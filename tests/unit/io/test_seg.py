"""DICOM-SEG output: geometry proof (voxel for voxel and in LPS), content, conformance (dciodvfy)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import RLELossless

from msam_core.errors import UnsupportedRequest
from msam_core.io.dicom import read_series
from msam_core.io.seg import msam_version, read_seg, write_seg
from msam_core.io.volume import Volume
from tests.unit.io.dicom_synth import (
    asymmetric_mask,
    dciodvfy_errors,
    make_ct_series,
    make_legacy_multiframe,
    make_split_multiframe,
    rotation,
    sphere_mask,
)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
OBLIQUE = rotation((0.3, -1.0, 0.8), 33.0)

SOURCES = {
    "axial_reversed": {"write_order": "reverse"},
    "flipped_rows_columns": {"row_dir": (-1.0, 0.0, 0.0), "col_dir": (0.0, -1.0, 0.0), "write_order": "shuffle"},
    "sagittal": {"row_dir": (0.0, 1.0, 0.0), "col_dir": (0.0, 0.0, -1.0)},
    "oblique_anisotropic": {
        "row_dir": tuple(OBLIQUE[:, 0]),
        "col_dir": tuple(OBLIQUE[:, 1]),
        "spacing": (0.6, 1.3, 3.1),
        "write_order": "shuffle",
    },
}


def _source(tmp_path: Path, name: str, multiframe: bool) -> tuple[Volume, object]:
    series = make_ct_series(tmp_path / "ct", **SOURCES[name])
    if multiframe:
        return read_series(make_legacy_multiframe(series, tmp_path / "mf.dcm")), series
    return read_series(tmp_path / "ct"), series


def _seg_foreground_lps(path: Path) -> dict[int, np.ndarray]:
    """LPS mm of every foreground SEG pixel per segment, from the SEG's own frame geometry only."""
    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    out: dict[int, list[np.ndarray]] = {}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        ident = group.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(ident[0].ReferencedSegmentNumber)
        r, c = np.nonzero(frames[f])
        pts = ipp + np.outer(c * col_spacing, iop[:3]) + np.outer(r * row_spacing, iop[3:])
        out.setdefault(number, []).append(pts)
    return {n: np.concatenate(p) for n, p in out.items()}


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_seg_round_trip_voxel_for_voxel(tmp_path: Path, name: str, multiframe: bool) -> None:
    volume, _ = _source(tmp_path, name, multiframe)
    mask = asymmetric_mask(volume.shape)
    path = write_seg(mask, volume, tmp_path / "out.seg.dcm")
    np.testing.assert_array_equal(read_seg(path, volume), mask)
    assert dciodvfy_errors(path) == []

    # second, independent path: highdicom's own source-instance/frame references
    seg = hd.seg.segread(path)
    if multiframe:
        src_uid = volume.meta["sop_instance_uids"][0]
        frames = volume.meta["frame_numbers"]
        pixels = seg.get_pixels_by_source_frame(
            src_uid, frames, combine_segments=True, relabel=False, assert_missing_frames_are_empty=True
        )
    else:
        pixels = seg.get_pixels_by_source_instance(volume.meta["sop_instance_uids"], combine_segments=True, relabel=False)
    np.testing.assert_array_equal(pixels.transpose(2, 1, 0), mask)


@pytest.mark.parametrize(
    ("name", "multiframe"),
    [("axial_reversed", False), ("flipped_rows_columns", False), ("oblique_anisotropic", False), ("sagittal", True)],
)
def test_seg_centroid_in_patient_coordinates(tmp_path: Path, name: str, multiframe: bool) -> None:
    """A sphere placed at a known LPS point must come back there: catches mirrored/swapped SEGs."""
    volume, series = _source(tmp_path, name, multiframe)
    affine = series.affine_lps  # the generator's geometry, not the reader's
    centre_ijk = np.array([5.2, 10.7, 6.1])  # off-centre on purpose: a flip moves it
    centre_lps = affine[:3, :3] @ centre_ijk + affine[:3, 3]
    mask = sphere_mask(volume.shape, affine, centre_lps, radius=3.5).astype(np.uint8)
    assert mask.sum() > 20
    path = write_seg(mask, volume, tmp_path / "sphere.seg.dcm")
    pts = _seg_foreground_lps(path)[1]
    assert len(pts) == mask.sum()
    voxel_diag = float(np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)))
    assert np.linalg.norm(pts.mean(axis=0) - centre_lps) < 0.25 * voxel_diag
    assert np.max(np.linalg.norm(pts - centre_lps, axis=1)) <= 3.5 + 1e-6
    # the same point in the reader's RAS is (-x, -y, z)
    ras = volume.voxel_to_ras(np.argwhere(mask).astype(float)).mean(axis=0)
    np.testing.assert_allclose(ras, pts.mean(axis=0) * np.array([-1.0, -1.0, 1.0]), atol=1e-6)
    assert dciodvfy_errors(path) == []


def test_seg_content(tmp_path: Path) -> None:
    volume, series = _source(tmp_path, "axial_reversed", False)
    mask = asymmetric_mask(volume.shape)
    path = write_seg(mask, volume, tmp_path / "out.seg.dcm", algorithm_name="msam_default",
                     algorithm_version="0.1.0+sha256.0123456789abcdef")
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == series.for_uid
    assert seg.StudyInstanceUID == series.study_uid
    assert seg.SeriesInstanceUID != series.series_uid
    assert seg.SeriesDescription == "msam lesion segmentation"
    assert seg.Manufacturer == "msam"
    assert seg.SoftwareVersions == msam_version()  # the software; the model is the algorithm below
    assert seg.PatientID == "SYN0001"  # copied from the source, as DICOM requires
    # one segment per label, SNOMED CT codes, SEMIAUTOMATIC, algorithm identification
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    for label, item in enumerate(seg.SegmentSequence, start=1):
        assert item.SegmentLabel == f"Lesion {label}"
        assert item.TrackingID == f"msam lesion {label}"
        cat = item.SegmentedPropertyCategoryCodeSequence[0]
        typ = item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodingSchemeDesignator, cat.CodeValue) == ("SCT", "49755003")
        assert (typ.CodingSchemeDesignator, typ.CodeValue) == ("SCT", "108369006")
        assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
        assert item.SegmentAlgorithmName == "msam_default"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "msam_default"
        assert algo.AlgorithmVersion == "0.1.0+sha256.0123456789abcdef"
        family = algo.AlgorithmFamilyCodeSequence[0]
        assert (family.CodingSchemeDesignator, family.CodeValue) == ("DCM", "123110")
    # references the source series and only its instances
    refs = seg.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in refs] == [series.series_uid]
    referenced = {i.ReferencedSOPInstanceUID for i in refs[0].ReferencedInstanceSequence}
    assert referenced <= set(volume.meta["sop_instance_uids"])
    # empty frames omitted: one frame per (slice, segment) that holds voxels
    expected_frames = sum(int(np.any(mask[:, :, k] == s)) for k in range(mask.shape[2]) for s in (1, 2, 3))
    assert int(seg.NumberOfFrames) == expected_frames < mask.shape[2] * 3
    assert dciodvfy_errors(path) == []


def test_seg_custom_labels_codes_and_sparse_labels(tmp_path: Path) -> None:
    volume, _ = _source(tmp_path, "flipped_rows_columns", False)
    mask = asymmetric_mask(volume.shape)
    mask[mask == 2] = 7  # labels need not be consecutive
    custom = (codes.SCT.Tissue, codes.SCT.Lesion)
    path = write_seg(mask, volume, tmp_path / "out.seg.dcm", segment_labels={7: "liver lesion"}, codes={7: custom})
    seg = pydicom.dcmread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lesion 1", "Lesion 3", "liver lesion"]
    typ = seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
    assert typ.CodeValue == custom[1].value
    np.testing.assert_array_equal(read_seg(path, volume), mask)
    assert dciodvfy_errors(path) == []


def test_seg_from_compressed_source(tmp_path: Path) -> None:
    make_ct_series(tmp_path / "ct", transfer_syntax=RLELossless, write_order="reverse")
    volume = read_series(tmp_path / "ct")
    mask = asymmetric_mask(volume.shape)
    path = write_seg(mask, volume, tmp_path / "out.seg.dcm")
    np.testing.assert_array_equal(read_seg(path, volume), mask)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
def test_labelmap_on_request(tmp_path: Path, multiframe: bool) -> None:
    """LABELMAP (Label Map Segmentation Storage). Debian's dciodvfy predates it, so not validated."""
    volume, _ = _source(tmp_path, "oblique_anisotropic", multiframe)
    mask = asymmetric_mask(volume.shape)
    path = write_seg(mask, volume, tmp_path / "out.seg.dcm", labelmap=True)
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "LABELMAP"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    np.testing.assert_array_equal(read_seg(path, volume), mask)


def test_seg_refusals(tmp_path: Path) -> None:
    volume, _ = _source(tmp_path, "axial_reversed", False)
    with pytest.raises(UnsupportedRequest, match="empty"):
        write_seg(np.zeros(volume.shape, np.uint8), volume, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="shape"):
        write_seg(np.ones((2, 2, 2), np.uint8), volume, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="integer"):
        write_seg(np.ones(volume.shape, np.float32), volume, tmp_path / "x.dcm")
    nifti_like = Volume(volume.array, volume.affine, meta={"format": "nifti"})
    with pytest.raises(UnsupportedRequest, match="needs a DICOM input"):
        write_seg(np.ones(volume.shape, np.uint8), nifti_like, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_seg_refuses_a_series_of_several_multiframe_instances(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct", shape=(20, 16, 8))
    volume = read_series(make_split_multiframe(series, tmp_path / "mf"))
    with pytest.raises(UnsupportedRequest, match="several multi-frame instances"):
        write_seg(asymmetric_mask(volume.shape), volume, tmp_path / "x.dcm")


def test_centroid_check_detects_a_mirrored_seg(tmp_path: Path) -> None:
    """The centroid check is sensitive: a SEG of the left-right mirrored mask lands elsewhere."""
    volume, series = _source(tmp_path, "axial_reversed", False)
    affine = series.affine_lps
    centre_lps = affine[:3, :3] @ np.array([5.2, 10.7, 6.1]) + affine[:3, 3]
    mask = sphere_mask(volume.shape, affine, centre_lps, radius=3.5).astype(np.uint8)
    path = write_seg(mask[::-1].copy(), volume, tmp_path / "mirrored.seg.dcm")
    pts = _seg_foreground_lps(path)[1]
    assert np.linalg.norm(pts.mean(axis=0) - centre_lps) > 3.0
