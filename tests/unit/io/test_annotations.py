"""Line measurements found in SR and GSPS objects (written by highdicom as a workstation would):
mapped onto the series through its geometry, in LPS mm, with the reported length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from msam_core.io.annotations import find_lines
from msam_core.io.dicom import read_series
from tests.unit.io.annotation_synth import line_gsps, recist_sr, recist_sr_3d
from tests.unit.io.dicom_synth import make_ct_series, rotation


@pytest.mark.parametrize("oblique", [False, True])
def test_sr_and_gsps_lines_land_on_their_voxels(tmp_path: Path, oblique: bool) -> None:
    r = rotation((1, 0.3, 0.2), 25) if oblique else np.eye(3)
    series = make_ct_series(tmp_path / "ct", shape=(40, 36, 10), spacing=(0.8, 0.7, 2.5), write_order="shuffle",
                            row_dir=tuple(r[:, 0]), col_dir=tuple(r[:, 1]))
    volume = read_series(series.paths)
    by_uid = {str(d.SOPInstanceUID): d for d in series.datasets}
    k = 4
    image = by_uid[volume.meta["sop_instance_uids"][k]]
    # pixel (column, row) = (i + 0.5, j + 0.5) is the centre of voxel (i, j, k)
    expected = volume.voxel_to_ras(np.array([[10.0, 12.0, k], [30.0, 20.0, k]])) * [-1, -1, 1]
    length = float(np.linalg.norm(expected[1] - expected[0]))
    other = make_ct_series(tmp_path / "other", shape=(20, 20, 4))
    objects = [
        recist_sr(image, [(10.5, 12.5), (30.5, 20.5)], round(length, 1), tmp_path / "sr.dcm"),
        line_gsps(by_uid[volume.meta["sop_instance_uids"][k + 2]], [(5.5, 5.5), (15.5, 9.5), (25.5, 5.5)],
                  tmp_path / "pr.dcm"),
        recist_sr_3d(image, [tuple(expected[0] + [0, 0, 1.0]), tuple(expected[1] + [0, 0, 1.0])], tmp_path / "sr3d.dcm"),
        recist_sr(other.datasets[1], [(3, 3), (9, 9)], 5.0, tmp_path / "other_sr.dcm"),  # another series: ignored
    ]
    found = find_lines([pydicom.dcmread(p) for p in objects], volume)
    assert [f.source for f in found] == ["SR", "SR", "GSPS"]
    two_d = next(f for f in found if f.reported_length_mm is not None)
    assert np.allclose([two_d.start_lps, two_d.end_lps], expected, atol=1e-6)
    assert two_d.reported_length_mm == pytest.approx(length, abs=0.05) and two_d.length_mm == pytest.approx(length)
    three_d = next(f for f in found if f.source == "SR" and f.reported_length_mm is None)
    assert np.allclose([three_d.start_lps, three_d.end_lps], expected + [0, 0, 1.0], atol=1e-6)
    gsps = found[2]  # a three-point polyline: its two points farthest apart
    ends = volume.voxel_to_ras(np.array([[5.0, 5.0, k + 2], [25.0, 5.0, k + 2]])) * [-1, -1, 1]
    assert np.allclose(sorted([gsps.start_lps, gsps.end_lps]), sorted(ends.tolist()), atol=1e-6)
