"""Prompt validation: every user mistake is an InvalidPrompt with a message that says what."""

from __future__ import annotations

import numpy as np
import pytest

from msam_core.errors import InvalidPrompt
from msam_core.io.volume import Volume
from msam_core.pipeline.prompts import Box, Point, resolve_prompts, to_ras
from tests.unit.pipeline.phantoms import centred_affine, rotation

AFFINE = centred_affine((40, 30, 20), (1.0, 1.5, 3.0), rotation((0, 1, 1), 20.0), (5.0, -7.0, 11.0))
VOLUME = Volume(np.zeros((40, 30, 20), np.float32), AFFINE)


def test_spaces_convert_consistently():
    voxel = np.array([[3.0, 4.0, 5.0], [39.0, 0.0, 19.0]])
    ras = to_ras(voxel, "voxel", VOLUME)
    np.testing.assert_allclose(ras, voxel @ AFFINE[:3, :3].T + AFFINE[:3, 3])
    lps = ras * [-1, -1, 1]
    np.testing.assert_allclose(to_ras(lps, "LPS", VOLUME), ras)
    np.testing.assert_allclose(to_ras(ras, "ras", VOLUME), ras)  # case-insensitive
    np.testing.assert_allclose(VOLUME.ras_to_voxel(ras), voxel, atol=1e-9)


def test_points_group_per_lesion_and_centre_on_first_positive():
    lesions = resolve_prompts(VOLUME, [
        Point((1, 1, 1), label=0), Point((10, 10, 10)), Point((12, 10, 10)),
        Point((30, 20, 5), lesion=3),
    ])
    assert [l.lesion for l in lesions] == [1, 3]
    np.testing.assert_allclose(lesions[0].center_ras, VOLUME.voxel_to_ras([10, 10, 10])[0])
    assert lesions[0].labels.tolist() == [0, 1, 1]
    # one place clicked twice alike, or with both labels for two lesions, is no contradiction
    twice = resolve_prompts(VOLUME, [Point((10, 10, 10)), Point((10, 10, 10)), Point((10, 10, 10), label=0, lesion=2),
                                     Point((20, 10, 10), lesion=2)])
    assert [les.labels.tolist() for les in twice] == [[1, 1], [0, 1]]


@pytest.mark.parametrize("points, boxes, message", [
    ([Point((40.2, 0, 0))], [], "outside the image"),
    ([Point((-0.7, 0, 0))], [], r"outside the image: it falls at voxel \[-0.7, .*\] but the image has shape "
                                r"\[40, 30, 20\]: its voxels cover positions -0.5 to shape-0.5"),
    ([Point((0, 0, 1e6), space="RAS")], [], "outside the image"),
    ([Point((float("nan"), 1, 1))], [], "not a finite number"),
    ([Point((1, 1, 1), label=0)], [], "no positive point"),
    ([Point((1, 1, 1), label=2)], [], "label must be 1"),
    ([Point((1, 1, 1), lesion=0)], [], "lesion number"),
    ([Point((1, 1, 1), space="IJK")], [], "unknown coordinate space"),
    ([], [], "no prompt given"),
    ([], [Box((0, 0, 0), (100, 100, 100), space="voxel")], "outside the image"),
    ([], [Box((0, 0, 0), (0, 5, 5), space="RAS")], "flat"),
    ([], [Box((1, 1, 1), (5, 5, 5)), Box((2, 2, 2), (6, 6, 6))], "several boxes"),
    ([Point((4, 5, 6)), Point((4, 5, 6), label=0)], [], r"point \[4.0, 5.0, 6.0\] \(voxel\) is both a positive and a "
                                                         "negative click of lesion 1"),
])
def test_invalid_prompts_are_refused_with_a_reason(points, boxes, message):
    with pytest.raises(InvalidPrompt, match=message):
        resolve_prompts(VOLUME, points, boxes)


def test_a_point_within_the_first_or_last_voxel_is_inside():
    """The refusal's wording holds: a point half a voxel beyond the first or last voxel centre
    still lies in that voxel."""
    near = [Point((-0.49, 0, 0)), Point((39.49, 29.5, 19.5))]
    assert [les.lesion for les in resolve_prompts(VOLUME, near)] == [1]


def test_box_alone_prompts_a_lesion_centred_on_it():
    (lesion,) = resolve_prompts(VOLUME, [], [Box((2, 2, 2), (10, 12, 8))])
    np.testing.assert_allclose(lesion.center_ras, VOLUME.voxel_to_ras([6, 7, 5])[0])
    inside = lesion.box.contains_ras(VOLUME.voxel_to_ras([[2, 2, 2], [10, 12, 8], [11, 2, 2]]), VOLUME)
    assert inside.tolist() == [True, True, False]


def test_prior_mask_labels_become_lesions():
    prior = np.zeros(VOLUME.shape, np.uint8)
    prior[5:10, 5:10, 5:10] = 1
    prior[20:30, 10:20, 2:8] = 2
    lesions = resolve_prompts(VOLUME, [Point((7, 7, 7), label=0, lesion=1)], [], prior)
    assert [l.lesion for l in lesions] == [1, 2]
    # a lesion given by its prior alone is centred on the prior's deepest voxel
    centre = np.rint(VOLUME.ras_to_voxel(lesions[1].center_ras)[0]).astype(int)
    assert prior[tuple(centre)] == 2 and centre[2] in (4, 5)  # as deep as the 6-slice slab allows
    with pytest.raises(InvalidPrompt, match="shape"):
        resolve_prompts(VOLUME, [], [], np.zeros((3, 3, 3)))
    with pytest.raises(InvalidPrompt, match="empty"):
        resolve_prompts(VOLUME, [], [], np.zeros(VOLUME.shape))


@pytest.mark.parametrize("value, says", [(0.8, "holds 0.8"), (-1, "holds -1"), (float("nan"), "holds nan")])
def test_a_prior_of_other_values_than_labels_is_refused(value, says):
    """A probability map or a signed mask is not read as labels (0.8 truncated to 0 dropped the
    lesion and counted the background as "lesion 0"; -1 overflowed)."""
    prior = np.zeros(VOLUME.shape, np.float32)
    prior[5:10, 5:10, 5:10] = value
    with pytest.raises(InvalidPrompt, match=f"the prior mask {says}: its values must be lesion labels"):
        resolve_prompts(VOLUME, [Point((7, 7, 7))], [], prior)
    prior[5:10, 5:10, 5:10] = 255.0  # a binary mask stored 0/255 is a label like any other
    (lesion,) = resolve_prompts(VOLUME, [Point((7, 7, 7))], [], prior)
    assert lesion.lesion == 1 and lesion.prior.sum() == 125


def test_binary_prior_goes_to_the_one_prompted_lesion():
    prior = np.zeros(VOLUME.shape, np.uint8)
    prior[5:10, 5:10, 5:10] = 1
    (lesion,) = resolve_prompts(VOLUME, [Point((7, 7, 7), lesion=4)], [], prior)
    assert lesion.lesion == 4 and lesion.prior.sum() == 125
