"""What the pipeline takes an image's values to be (HU or not, and why), crops of images already
normalised, per-lesion mask prompts, and the grid check a mask prompt must pass."""

from __future__ import annotations

import numpy as np
import pytest

from msam_core.errors import InvalidPrompt
from msam_core.io.volume import Volume
from msam_core.pipeline.preprocess import CropGrid, VolumeSampler, intensity_profile
from msam_core.pipeline.prompts import Point, resolve_prompts
from msam_service.masks import grid_difference, load_masks
from msam_service.prompts import resolve

AFFINE = np.array([[1.5, 0, 0, -30.0], [0, 1.5, 0, -30.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])


def _mr(shape=(40, 40, 20)) -> np.ndarray:
    """An MR-like image: a zero background around a bright body with a darker lesion."""
    rng = np.random.default_rng(0)
    ii, jj, kk = np.indices(shape)
    body = ((ii - 20) ** 2 + (jj - 20) ** 2) < 15 ** 2
    array = np.where(body, 400.0 + rng.normal(0, 20, shape), 0.0)
    array[((ii - 22) ** 2 + (jj - 18) ** 2 + (kk - 10) ** 2) < 16] = 150.0
    return array.astype(np.float32)


def test_ct_needs_evidence():
    ct = _mr() - 1000.0  # air at -1000 HU around the body
    profile = intensity_profile(Volume(ct, AFFINE))
    assert profile.hu and "below -500" in profile.reason and profile.background == 0
    assert intensity_profile(Volume(ct, AFFINE, modality="CT")).hu
    assert "modality CT" in intensity_profile(Volume(ct, AFFINE, modality="CT")).reason
    assert not intensity_profile(Volume(ct, AFFINE, modality="MR")).hu
    # a CT crop without air (fat at -100 HU at the lowest) is not taken for HU, and is measured from 0
    soft = np.clip(_mr(), 0, None) - 100.0
    profile = intensity_profile(Volume(soft, AFFINE))
    assert not profile.hu and profile.background == 0 and "no air" in profile.reason
    # a single stray voxel below -500 is not evidence of air
    stray = _mr()
    stray[0, 0, 0] = -3000.0
    assert not intensity_profile(Volume(stray, AFFINE)).hu


@pytest.mark.parametrize("how, fragment", [
    (lambda a: (a - a.mean()) / a.std(), "normalised"),
    (lambda a: a / a.max(), "0-1"),
    (lambda a: a.astype(np.uint16), "unsigned"),
])
def test_normalised_images_are_not_hu(how, fragment):
    profile = intensity_profile(Volume(how(_mr()), AFFINE))
    assert not profile.hu and fragment in profile.reason


def test_z_scored_image_gives_the_crops_of_the_original():
    """z-scoring is affine; measured from its background level, the crop the network sees is the
    one it would have seen from the image before it was normalised (within float rounding)."""
    original = _mr()
    z = (original - original.mean()) / original.std()
    grid = CropGrid.centred(np.array([3.0, -3.0, 0.0]), size=64)  # reaches beyond the image: padding too
    a = VolumeSampler(Volume(original, AFFINE)).crop(grid)
    b_sampler = VolumeSampler(Volume(z.astype(np.float32), AFFINE))
    assert b_sampler.intensity.background < 0
    b = b_sampler.crop(grid)
    assert float((a - b).abs().max()) < 1e-3


def test_lesion_priors_per_lesion():
    volume = Volume(_mr(), AFFINE)
    first = np.zeros(volume.shape, bool)
    first[20:24, 16:20, 8:12] = True
    second = np.zeros(volume.shape, bool)
    second[21:25, 16:20, 8:12] = True  # overlaps the first: separate masks, not one label volume
    lesions = resolve_prompts(volume, [Point((5, 5, 5), label=0, lesion=2)], lesion_priors={1: first, 2: second})
    assert [x.lesion for x in lesions] == [1, 2]
    assert lesions[0].prior.sum() == first.sum() and lesions[1].prior.sum() == second.sum()
    assert np.allclose(volume.ras_to_voxel(lesions[1].center_ras), [23, 18, 10], atol=1.01)
    with pytest.raises(InvalidPrompt, match="empty"):
        resolve_prompts(volume, lesion_priors={1: np.zeros(volume.shape, bool)})
    with pytest.raises(InvalidPrompt, match="shape"):
        resolve_prompts(volume, lesion_priors={1: first[:-1]})


def test_gateway_checks_clicks_of_masked_lesions_without_their_masks():
    volume = Volume(_mr(), AFFINE)
    mask = {"volume_id": "a" * 32, "label": None, "upload": None}
    doc = {"space": "voxel", "lesions": [{"negative": [[3, 3, 3]], "mask": mask}, {"mask": mask}]}
    assert [x.lesion for x in resolve(doc, volume)] == [1]  # its click checked; lesion 2 left to the worker
    assert resolve({"lesions": [{"mask": mask}]}, volume) == []
    doc["lesions"][0]["negative"] = [[300, 3, 3]]
    with pytest.raises(InvalidPrompt, match="outside the image"):
        resolve(doc, volume)


def test_grid_difference_names_what_differs():
    shape = (40, 40, 20)
    assert grid_difference(shape, AFFINE, shape, AFFINE + 1e-4) is None
    assert "shape" in grid_difference((40, 40, 21), AFFINE, shape, AFFINE)
    mirrored = AFFINE @ np.array([[-1, 0, 0, 39], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert "axis i mirrored" in grid_difference(shape, mirrored, shape, AFFINE)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [0, 2.5, 0]
    assert "first voxel" in grid_difference(shape, shifted, shape, AFFINE)
    finer = AFFINE.copy()
    finer[2, 2] = 1.0
    assert "voxel size" in grid_difference(shape, finer, shape, AFFINE)


def test_load_masks_by_label_and_refusals():
    volume = Volume(_mr(), AFFINE)
    labels = np.zeros(volume.shape, np.uint8)
    labels[20:24, 16:20, 8:12] = 2
    stored = {"m" * 32: Volume(labels, AFFINE)}
    doc = {"lesions": [{"mask": {"volume_id": "m" * 32, "label": 2}}, {"mask": {"volume_id": "m" * 32}}]}
    masks = load_masks(doc, volume, stored.get)
    assert masks[1].sum() == masks[2].sum() == 64
    doc["lesions"][0]["mask"]["label"] = 3
    with pytest.raises(InvalidPrompt, match="holds no voxel of label 3"):
        load_masks(doc, volume, stored.get)
    with pytest.raises(InvalidPrompt, match="no longer exists"):
        load_masks({"lesions": [{"mask": {"volume_id": "x" * 32}}]}, volume, stored.get)
    stored["f" * 32] = Volume(labels[::-1].copy(), AFFINE @ np.array([[-1, 0, 0, 39], [0, 1, 0, 0], [0, 0, 1, 0],
                                                                    [0, 0, 0, 1.0]]))
    with pytest.raises(InvalidPrompt, match="mirrored"):
        load_masks({"lesions": [{"mask": {"volume_id": "f" * 32}}]}, volume, stored.get)
