"""RTSTRUCT output: contours that rasterise back to the mask, sit on the referenced images, and pass dciodvfy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from msam_core.errors import UnsupportedRequest
from msam_core.io.dicom import read_series
from msam_core.io.rtstruct import RT_STRUCTURE_SET_STORAGE, mask_to_polygons, read_rtstruct, write_rtstruct
from msam_core.io.seg import msam_version
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

OBLIQUE = rotation((0.3, -1.0, 0.8), 33.0)
SOURCES = {
    "axial_reversed": {"write_order": "reverse"},
    "flipped_rows_columns": {"row_dir": (-1.0, 0.0, 0.0), "col_dir": (0.0, -1.0, 0.0), "write_order": "shuffle"},
    "oblique_anisotropic": {
        "row_dir": tuple(OBLIQUE[:, 0]),
        "col_dir": tuple(OBLIQUE[:, 1]),
        "spacing": (0.6, 1.3, 3.1),
        "write_order": "shuffle",
    },
}


def _tricky_mask(shape: tuple[int, int, int]) -> np.ndarray:
    m = asymmetric_mask(shape)
    m[4:12, 4:11, 4] = 1  # a ring: a hole inside a lesion
    m[6:9, 6:9, 4] = 0
    m[7, 7, 4] = 1  # an island inside the hole
    m[2, 12, 6] = 2  # two pixels touching only by a corner
    m[3, 13, 6] = 2
    return m


def _source(tmp_path: Path, name: str, multiframe: bool) -> tuple[Volume, object]:
    series = make_ct_series(tmp_path / "ct", **SOURCES[name])
    if multiframe:
        return read_series(make_legacy_multiframe(series, tmp_path / "mf.dcm")), series
    return read_series(tmp_path / "ct"), series


def test_polygons_follow_pixel_edges() -> None:
    assert mask_to_polygons(np.array([[True]])) == [[(0, 1), (0, 0), (1, 0), (1, 1)]]
    diagonal = mask_to_polygons(np.array([[1, 0], [0, 1]], dtype=bool))
    assert len(diagonal) == 2 and all(len(p) == 4 for p in diagonal)
    ring = mask_to_polygons(np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool))
    assert sorted(len(p) for p in ring) == [4, 4]
    assert mask_to_polygons(np.zeros((3, 3), dtype=bool)) == []


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_rtstruct_round_trip_and_conformance(tmp_path: Path, name: str, multiframe: bool) -> None:
    volume, series = _source(tmp_path, name, multiframe)
    mask = _tricky_mask(volume.shape)
    path = write_rtstruct(mask, volume, tmp_path / "out.rtstruct.dcm")
    np.testing.assert_array_equal(read_rtstruct(path, volume), mask)
    assert dciodvfy_errors(path) == []

    # every contour lies on the plane of the image it references (checked with the source
    # datasets' own geometry, not the reader's affine)
    ds = pydicom.dcmread(path)
    planes = {}
    for src in series.datasets:
        iop = np.array(src.ImageOrientationPatient, dtype=float)
        planes[src.SOPInstanceUID] = (np.array(src.ImagePositionPatient, dtype=float), np.cross(iop[:3], iop[3:]))
    n_contours = 0
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            ref = contour.ContourImageSequence[0]
            pts = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert int(contour.NumberOfContourPoints) == len(pts)
            if multiframe:
                assert ref.ReferencedSOPInstanceUID == volume.meta["sop_instance_uids"][0]
                k = volume.meta["frame_numbers"].index(int(ref.ReferencedFrameNumber))
                uid = _uid_at_depth(series, volume, k)
            else:
                uid = ref.ReferencedSOPInstanceUID
            origin, normal = planes[uid]
            np.testing.assert_allclose((pts - origin) @ normal, 0.0, atol=1e-3)
            n_contours += 1
    assert n_contours > 0


def _uid_at_depth(series, volume: Volume, k: int) -> str:
    """The single-frame source instance at slice k (to check a multi-frame reference's plane)."""
    lps_origin = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0])) @ volume.affine @ np.array([0, 0, k, 1.0])
    for src in series.datasets:
        if np.allclose(np.array(src.ImagePositionPatient, dtype=float), lps_origin[:3], atol=1e-3):
            return str(src.SOPInstanceUID)
    raise AssertionError("no source image at that depth")


def test_rtstruct_content_and_centroid(tmp_path: Path) -> None:
    volume, series = _source(tmp_path, "flipped_rows_columns", False)
    affine = series.affine_lps
    centre_lps = affine[:3, :3] @ np.array([5.2, 10.7, 6.1]) + affine[:3, 3]
    mask = sphere_mask(volume.shape, affine, centre_lps, radius=3.5).astype(np.uint8) * 4
    path = write_rtstruct(mask, volume, tmp_path / "out.rtstruct.dcm", roi_names={4: "GTV candidate"},
                          algorithm_name="msam_default", algorithm_version="9.9")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == series.study_uid and ds.FrameOfReferenceUID == series.for_uid
    assert ds.SoftwareVersions == msam_version()
    roi = ds.StructureSetROISequence[0]
    assert ds.ROIContourSequence and roi.ROIGenerationDescription == "msam_default 9.9"
    assert (int(roi.ROINumber), roi.ROIName, roi.ROIGenerationAlgorithm) == (4, "GTV candidate", "SEMIAUTOMATIC")
    assert roi.ReferencedFrameOfReferenceUID == series.for_uid
    ref_series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == series.series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence} == set(volume.meta["sop_instance_uids"])

    # area-weighted centroid of the contours, in LPS, from the contour data alone
    row_dir, col_dir = affine[:3, 0] / np.linalg.norm(affine[:3, 0]), affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    total_area, moment = 0.0, np.zeros(3)
    for contour in ds.ROIContourSequence[0].ContourSequence:
        pts = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        u, v = pts @ row_dir, pts @ col_dir
        cross = u * np.roll(v, -1) - np.roll(u, -1) * v
        area = cross.sum() / 2
        cu = ((u + np.roll(u, -1)) * cross).sum() / (6 * area)
        cv = ((v + np.roll(v, -1)) * cross).sum() / (6 * area)
        depth = pts[0] - (pts[0] @ row_dir) * row_dir - (pts[0] @ col_dir) * col_dir
        moment += area * (cu * row_dir + cv * col_dir + depth)
        total_area += area
    centroid = moment / total_area
    expected = (np.argwhere(mask > 0) @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)
    np.testing.assert_allclose(centroid, expected, atol=1e-3)  # pixel-edge polygons: exact centroid
    voxel_diag = float(np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)))
    assert np.linalg.norm(centroid - centre_lps) < 0.25 * voxel_diag
    assert dciodvfy_errors(path) == []


def test_rtstruct_refusals(tmp_path: Path) -> None:
    volume, _ = _source(tmp_path, "axial_reversed", False)
    with pytest.raises(UnsupportedRequest, match="empty"):
        write_rtstruct(np.zeros(volume.shape, np.uint8), volume, tmp_path / "x.dcm")
    nifti_like = Volume(volume.array, volume.affine, meta={"format": "nifti"})
    with pytest.raises(UnsupportedRequest, match="RTSTRUCT output needs a DICOM input"):
        write_rtstruct(np.ones(volume.shape, np.uint8), nifti_like, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_rtstruct_for_a_series_of_several_multiframe_instances(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct", shape=(20, 16, 8), write_order="reverse")
    volume = read_series(make_split_multiframe(series, tmp_path / "mf"))
    mask = _tricky_mask(volume.shape)
    path = write_rtstruct(mask, volume, tmp_path / "out.rtstruct.dcm")
    np.testing.assert_array_equal(read_rtstruct(path, volume), mask)
    ds = pydicom.dcmread(path)
    refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in refs.ContourImageSequence} == set(volume.meta["sop_instance_uids"])
    assert dciodvfy_errors(path) == []
