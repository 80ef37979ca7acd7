"""Synthetic lesions: inside their organ, deterministic from the seed, MSD layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from msam_core.train.synth import insert_lesion, make_case, synthesize
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
