"""A RECIST line as the prompt: validation (clear messages), the clicks it becomes, the job
document's lines, and the expert line ``msam evaluate`` draws from a mask."""

from __future__ import annotations

import numpy as np
import pytest

from msam_core.errors import InvalidPrompt
from msam_core.io.volume import Volume
from msam_core.pipeline.lines import DEFAULT_STRATEGY, STRATEGIES, Line, line_as_points, line_points, resolve_line
from msam_service.prompts import reference_lines, resolve

AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, 0.9, 0, -20.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
VOLUME = Volume(np.zeros((60, 50, 20), np.int16), AFFINE, modality="CT")


@pytest.mark.parametrize("line, message", [
    (Line((10, 10, 5), (10, 10, 5)), "zero length"),
    (Line((10, 10, 5), (70, 10, 5)), "end is outside the image"),
    (Line((-3, 10, 5), (70, 10, 5)), "start and end is outside the image"),
    (Line((10, 10, 5), (20, 12, 6)), "not in one slice"),
    (Line((10, 10, 5), (20, float("nan"), 5)), "not a finite number"),
])
def test_bad_lines_say_what_is_wrong(line: Line, message: str) -> None:
    with pytest.raises(InvalidPrompt, match=message):
        resolve_line(line, VOLUME)


def test_a_world_line_may_cross_slices_and_becomes_clicks_midpoint_first() -> None:
    ras = VOLUME.voxel_to_ras(np.array([[10, 10, 5], [30, 20, 6]]))
    lps = ras * [-1, -1, 1]
    line = Line(tuple(lps[0]), tuple(lps[1]), space="LPS", lesion=2)
    assert np.allclose(resolve_line(line, VOLUME), ras)
    clicks = line_as_points(line, VOLUME, "three")
    assert [p.lesion for p in clicks] == [2, 2, 2] and all(p.label == 1 and p.space == "RAS" for p in clicks)
    assert np.allclose(clicks[0].xyz, ras.mean(axis=0))
    points, labels = line_points(ras, "five")
    assert np.allclose(points[3], ras[0] + 0.15 * (ras[1] - ras[0])) and list(labels) == [1] * 5
    points, labels = line_points(ras, "three_bounded")
    assert list(labels) == [1, 1, 1, 0, 0] and np.allclose(points[3], ras[0] - 0.2 * (ras[1] - ras[0]))
    # a negative click beyond an end that leaves the image is dropped, never a 422
    edge = Line((1, 10, 5), (30, 10, 5))
    assert [p.label for p in line_as_points(edge, VOLUME, "three_bounded")] == [1, 1, 1, 0]
    with pytest.raises(InvalidPrompt, match="unknown line strategy"):
        line_points(ras, "ten")


def test_a_job_document_line_centres_its_lesion_and_is_reported() -> None:
    doc = {"space": "voxel", "lesions": [{"positive": [[40, 40, 10]]},
                                         {"line": [[10, 10, 5], [30, 10, 5]], "negative": [[5, 5, 5]]}]}
    lesions = resolve(doc, VOLUME)
    second = lesions[1]
    assert second.lesion == 2
    assert np.allclose(second.center_ras, VOLUME.voxel_to_ras(np.array([20, 10, 5]))[0])
    positive, negative = STRATEGIES[DEFAULT_STRATEGY]  # the line's clicks first, then the request's negative
    assert list(second.labels) == [1] * len(positive) + [0] * len(negative) + [0]
    ref = reference_lines(doc, VOLUME)
    assert list(ref) == [2] and ref[2]["length_mm"] == pytest.approx(20 * 0.8) and ref[2]["source"] == "request"
    assert ref[2]["start_lps"] == pytest.approx((VOLUME.voxel_to_ras(np.array([10, 10, 5]))[0] * [-1, -1, 1]).tolist())
    with pytest.raises(InvalidPrompt, match="not in one slice"):
        resolve({"space": "voxel", "lesions": [{"line": [[10, 10, 5], [30, 10, 7]]}]}, VOLUME)


def test_the_expert_line_is_the_masks_long_axis_in_one_slice() -> None:
    from msam_core.measure import measure_lesion
    from msam_train.evaluate import expert_line

    ii, jj, kk = np.indices(VOLUME.shape)
    mask = ((ii - 30) / 14.0) ** 2 + ((jj - 25) / 8.0) ** 2 + ((kk - 10) / 4.0) ** 2 <= 1
    ras = expert_line(mask, VOLUME)
    voxels = VOLUME.ras_to_voxel(ras)
    assert voxels[0, 2] == pytest.approx(voxels[1, 2]) == pytest.approx(10)  # in the lesion's largest slice
    assert np.linalg.norm(ras[1] - ras[0]) == pytest.approx(measure_lesion(mask, VOLUME).long_axis.length_mm)
    resolve_line(Line(tuple(voxels[0]), tuple(voxels[1])), VOLUME)  # a valid voxel-space line prompt
