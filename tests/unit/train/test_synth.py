"""Synthetic lesions: inside their organ, deterministic from the seed, MSD layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from msam_train.synth import insert_lesion, make_case, synthesize
from tests.unit.train.phantoms import phantom_scan, phantom_scans


def test_lesions_lie_inside_their_organ() -> None:
    for modality in ("CT", "MR"):
        scan = phantom_scan(modality=modality)
        for index in range(6):
            case = make_case(scan, seed=3, index=index)
            assert case.lesions, "every phantom case gets at least one lesion"
            for info in case.lesions:
                lesion = case.labels == info.label
                assert lesion.sum() == info.voxels >= 4
                assert np.all(scan.organs[info.organ][lesion]), f"{info.organ} lesion leaves its organ"


def test_lesion_changes_intensity_only_near_the_lesion() -> None:
    scan = phantom_scan()
    image = scan.image.copy()
    labels = np.zeros(image.shape, np.uint8)
    info = insert_lesion(np.random.default_rng(5), scan, image, labels, "liver", label=1)
    assert info is not None
    changed = np.abs(image - scan.image) > 1e-3
    assert changed[labels == 1].mean() > 0.9
    # outside the organ (dilated by the blur margin) nothing changes
    from scipy import ndimage

    near = ndimage.binary_dilation(scan.organs["liver"], iterations=1)
    assert not changed[~near].any()
    lesion_mean = float(image[labels == 1].mean())
    organ_mean = float(np.median(scan.image[scan.organs["liver"]]))
    assert abs(lesion_mean - organ_mean) > 5  # hypo or hyper, not invisible


def test_same_seed_same_case_other_seed_other_case() -> None:
    scan = phantom_scan()
    a, b = make_case(scan, 7, 2), make_case(scan, 7, 2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.lesions == b.lesions
    c = make_case(scan, 8, 2)
    assert not np.array_equal(a.labels, c.labels)


def test_synthesize_writes_msd_layout_deterministically(tmp_path) -> None:
    scans = phantom_scans()
    d1 = synthesize(tmp_path / "a", seed=11, n_train=3, n_val=1, n_heldout=1, scans=scans, log=lambda *_: None)
    d2 = synthesize(tmp_path / "b", seed=11, n_train=3, n_val=1, n_heldout=1, scans=scans, log=lambda *_: None)
    manifest = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert manifest["numTraining"] == len(manifest["training"]) == 3
    assert {e["source"] for e in manifest["heldout"]} == {"phantom_heldout"}
    assert "phantom_heldout" not in {e["source"] for e in manifest["training"] + manifest["validation"]}
    assert "Apache-2.0" in manifest["licence"]
    for e1, e2 in zip(d1["training"], d2["training"]):
        assert e1["lesions"] == e2["lesions"]
        for key in ("image", "label"):
            x = np.asarray(nib.load(tmp_path / "a" / e1[key]).dataobj)
            y = np.asarray(nib.load(tmp_path / "b" / e2[key]).dataobj)
            np.testing.assert_array_equal(x, y)
    label = nib.load(tmp_path / "a" / d1["training"][0]["label"])
    assert np.asarray(label.dataobj).max() == len(d1["training"][0]["lesions"])
    np.testing.assert_allclose(label.affine, scans[0].affine)


def test_thick_copies_are_axial_slabs_of_the_validation_and_heldout_cases(tmp_path) -> None:
    """``validation_thick`` / ``heldout_thick``: each case as 4.5 mm slabs along its S-most axis,
    the image the slab means, the labels the middle slices, in the same place in the world."""
    from msam_train.thick import FACTOR, slice_axis

    d = synthesize(tmp_path, seed=11, n_train=1, n_val=2, n_heldout=1, scans=phantom_scans(), log=lambda *_: None)
    for split in ("validation", "heldout"):
        assert [e["image"].replace("_thick", "") for e in d[f"{split}_thick"]] == [e["image"] for e in d[split]]
    thin, thick = d["validation"][0], d["validation_thick"][0]
    image, labels = nib.load(tmp_path / thin["image"]), nib.load(tmp_path / thin["label"])
    t_image, t_labels = nib.load(tmp_path / thick["image"]), nib.load(tmp_path / thick["label"])
    axis = slice_axis(image.affine)
    assert t_image.header.get_zooms()[axis] == pytest.approx(image.header.get_zooms()[axis] * FACTOR)
    thin_array = np.moveaxis(np.asarray(image.dataobj, np.float32), axis, -1)
    slab = np.moveaxis(np.asarray(t_image.dataobj, np.float32), axis, -1)[..., 1]
    expected = thin_array[..., FACTOR:2 * FACTOR].mean(-1)
    np.testing.assert_allclose(slab, expected, atol=1.0 if thin["modality"] == "CT" else 1e-3)  # CT: int16 both ways
    middle = np.moveaxis(np.asarray(labels.dataobj), axis, -1)[..., FACTOR + FACTOR // 2]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(t_labels.dataobj), axis, -1)[..., 1], middle)
    # slab 1 is centred on thin slice FACTOR + (FACTOR - 1) / 2: the same point in the world
    thin_centre = image.affine @ np.r_[np.eye(3)[axis] * (FACTOR + (FACTOR - 1) / 2), 1]
    np.testing.assert_allclose(t_image.affine @ np.r_[np.eye(3)[axis], 1], thin_centre)
    assert {x["label"] for x in thick["lesions"]} <= {x["label"] for x in thin["lesions"]}
    for info in thick["lesions"]:
        assert info["voxels"] == int((np.asarray(t_labels.dataobj) == info["label"]).sum()) > 0


def test_thick_copy_refuses_what_it_cannot_slab() -> None:
    from msam_train.thick import slice_axis, thick_copy

    image, labels, affine = np.zeros((4, 5, 6)), np.zeros((4, 5, 6), np.uint8), np.eye(4)
    assert slice_axis(np.array([[0, 0, 2, 0], [1.5, 0, 0, 0], [0, -3, 0, 0], [0, 0, 0, 1]])) == 1  # a coronal stack
    with pytest.raises(ValueError, match="share a grid"):
        thick_copy(image, labels[:3], affine)
    with pytest.raises(ValueError, match="factor >= 2"):
        thick_copy(image, labels, affine, factor=1)
    with pytest.raises(ValueError, match="phase"):
        thick_copy(image, labels, affine, factor=3, phase=3)
    with pytest.raises(ValueError, match="no slab"):
        thick_copy(image, labels, affine, factor=4, phase=3)
