"""``msam data real``: the PyRadiomics tumour cases become an MSD evaluation set, geometry intact.

The archive here is made by the test (same member layout as PyRadiomics' sdist) - the real one is
fetched by ``make model`` only, so the unit tests need no network.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import SimpleITK as sitk

from msam_core.errors import UnsupportedRequest
from msam_core.io.load import load_volume
from msam_train.data import list_cases
from msam_train.real import MEMBER_DIR, extract_cases, write_dataset
from msam_train.sources import download

CASES = {"tumour_ct": ("CT", "lung"), "tumour_mr": ("MR", "brain")}
SPACING = (0.7, 0.8, 5.0)  # x, y, z mm: thick slices as in the real cases
ORIGIN = (120.0, 200.0, -300.0)  # LPS
DIRECTION = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)  # first two axes flipped in LPS (= R, A in RAS)
SHAPE_ZYX = (12, 40, 36)
LESION_ZYX = (slice(4, 7), slice(10, 20), slice(5, 13))  # 3 x 10 x 8 = 240 voxels


def _nrrd(array: np.ndarray, folder) -> bytes:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    path = str(folder / "tmp.nrrd")
    sitk.WriteImage(img, path)
    return open(path, "rb").read()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdist")
    path = folder / "pyradiomics-3.1.0.tar.gz"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for case, (modality, _) in CASES.items():
            image = rng.normal(-700 if modality == "CT" else 200, 20, SHAPE_ZYX).astype(np.int16)
            label = np.zeros(SHAPE_ZYX, np.uint8)
            label[LESION_ZYX] = 1
            image[LESION_ZYX] += 700 if modality == "CT" else 300
            for kind, array in (("image", image), ("label", label)):
                data = _nrrd(array, folder)
                info = tarfile.TarInfo(f"{MEMBER_DIR}{case}_{kind}.nrrd")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_real_cases_become_an_msd_split_with_their_own_geometry(archive, tmp_path) -> None:
    files = extract_cases(archive, tmp_path / "files", CASES)
    dataset = write_dataset(files, tmp_path / "real", CASES)
    assert json.loads((tmp_path / "real" / "dataset.json").read_text()) == dataset
    assert [e["modality"] for e in dataset["real"]] == ["CT", "MR"] and dataset["training"] == []
    facts = dataset["real"][0]["lesions"]
    assert len(facts) == 1 and facts[0]["organ"] == "lung" and facts[0]["voxels"] == 240
    expected = (6 * 240 * np.prod(SPACING) / np.pi) ** (1 / 3)  # equivalent diameter from the voxel volume
    assert abs(facts[0]["diameter_mm"] - expected) < 0.01

    cases = list_cases(tmp_path / "real", "real")
    assert [c.name for c in cases] == ["tumour_ct", "tumour_mr"]
    image, label = load_volume(cases[0].image), load_volume(cases[0].label)
    np.testing.assert_allclose(image.affine, label.affine)
    # NRRD stores LPS; the volume's affine is RAS: the LPS-flipped axes come out positive R, A
    np.testing.assert_allclose(np.diag(image.affine)[:3], SPACING)
    np.testing.assert_allclose(image.affine[:3, 3], (-ORIGIN[0], -ORIGIN[1], ORIGIN[2]))
    # the lesion's first voxel (x=5, y=10, z=4) at its LPS position, in RAS
    lps = np.asarray(ORIGIN) + np.asarray(DIRECTION).reshape(3, 3) @ (np.asarray([5, 10, 4]) * SPACING)
    ras = image.voxel_to_ras(np.asarray([5, 10, 4]))[0]
    np.testing.assert_allclose(ras, lps * (-1, -1, 1), atol=1e-4)
    assert np.asarray(label.array)[5, 10, 4] == 1 and np.asarray(label.array)[4, 10, 4] == 0


def test_archive_without_a_case_is_refused(archive, tmp_path) -> None:
    with pytest.raises(ValueError, match="no pyradiomics-3.1.0/data/missing_image.nrrd"):
        extract_cases(archive, tmp_path, {"missing": ("CT", "lung")})


def test_download_refuses_a_file_with_the_wrong_checksum(tmp_path) -> None:
    (tmp_path / "thing-1.0.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(UnsupportedRequest, match="SHA-256 mismatch"):
        download("thing==1.0", "thing-1.0.tar.gz", "0" * 64, tmp_path)


def test_evaluate_reports_real_tumours_by_organ(archive, tmp_path) -> None:
    from msam_core.checkpoints import save_checkpoint
    from msam_core.model import build_model
    from msam_train.evaluate import evaluate

    write_dataset(extract_cases(archive, tmp_path / "files", CASES), tmp_path / "real", CASES)
    ck = save_checkpoint(build_model("msam_small"), tmp_path / "random.safetensors")
    summary = evaluate(tmp_path / "real", ck, "real", clicks=1, out_dir=tmp_path / "eval", log=lambda *_: None)
    groups = summary["groups"]
    assert summary["lesions"] == 2 and groups["organ=lung"]["msam"]["lesions"] == 1
    assert groups["modality=MR"]["region_growing"]["lesions"] == 1
    # a 240-voxel bright box in a flat background: region growing from its centre finds most of it
    assert groups["organ=lung"]["region_growing"]["dice"][0] > 0.5
