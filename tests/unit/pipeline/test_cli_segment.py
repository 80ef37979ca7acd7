"""``msam segment``: real files, the real network (random weights), exit codes and messages."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from msam_core.cli import main
from msam_core.io.load import load_volume
from tests.unit.pipeline.phantoms import centred_affine, rotation, spheres_image

SHAPE = (48, 40, 24)
AFFINE = centred_affine(SHAPE, (0.9, 1.1, 2.5), rotation((0, 0, 1), 12.0), (-30.0, 15.0, 60.0))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import torch

    from msam_core.checkpoints import save_checkpoint
    from msam_core.model import build_model

    torch.manual_seed(0)  # fixed random weights: the same (non-empty) masks on every run
    root = tmp_path_factory.mktemp("cli")
    image = root / "image.nii.gz"
    nib.save(nib.Nifti1Image(spheres_image(SHAPE, AFFINE, [((-30.0, 15.0, 60.0), 10.0)]), AFFINE), str(image))
    prior = np.zeros(SHAPE, np.uint8)
    prior[20:28, 16:24, 10:14] = 1
    nib.save(nib.Nifti1Image(prior, AFFINE), str(root / "prior.nii.gz"))
    checkpoint = save_checkpoint(build_model("msam_small"), root / "small.safetensors")
    return {"root": root, "image": image, "prior": root / "prior.nii.gz", "ckpt": Path(checkpoint)}


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["segment", *map(str, argv)])
    return code, capsys.readouterr().err


def test_nifti_and_png_outputs(files, capsys):
    out = files["root"] / "mask.nii.gz"
    report = files["root"] / "report.json"
    code = main(["segment", str(files["image"]), "-o", str(out), "--point", "24,20,12", "--point", "2,2,2,0",
                 "--checkpoint", str(files["ckpt"]), "--iterations", "2", "--max-windows", "2", "--report", str(report)])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 0, err
    assert "lesion 1:" in err
    mask = nib.load(str(out))
    # the report measures the mask written (the same voxels), endpoints in LPS
    from msam_core.io.load import load_volume
    from msam_core.measure import measure_lesion

    doc = json.loads(report.read_text())
    written = np.asarray(mask.dataobj) == 1
    hounsfield = "CT in Hounsfield units" in err  # what the pipeline took the values to be (stderr)
    expected = measure_lesion(written, load_volume(files["image"]), hounsfield=hounsfield)
    assert [x["lesion"] for x in doc["lesions"]] == [1]
    assert doc["lesions"][0]["measurements"] == expected.to_json()
    assert "long mm" in captured.out and f"{expected.volume_ml:.2f}" in captured.out
    assert mask.shape == SHAPE and mask.get_data_dtype() == np.uint8
    assert np.array_equal(mask.affine, nib.load(str(files["image"])).affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

    png = files["root"] / "preview.png"
    centre_ras = "-30,15,60"  # negative world coordinates pass as values
    code, err = _run(capsys, files["image"], "-o", png, "--space", "RAS", "--point", centre_ras,
                     "--checkpoint", files["ckpt"], "--max-windows", "1")
    assert code == 0, err
    assert Image.open(png).format == "PNG"


def test_line_prompt_and_its_length_in_the_report(files, capsys):
    out, report = files["root"] / "line.nii.gz", files["root"] / "line.json"
    code = main(["segment", str(files["image"]), "-o", str(out), "--line", "19,20,12,29,20,12",
                 "--checkpoint", str(files["ckpt"]), "--max-windows", "1", "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (lesion,) = json.loads(report.read_text())["lesions"]
    assert lesion["line_length_mm"] == pytest.approx(10 * np.linalg.norm(AFFINE[:3, 0]), abs=0.01)


def test_prior_mask_only(files, capsys):
    out = files["root"] / "refined.nii.gz"
    code, err = _run(capsys, files["image"], "-o", out, "--mask", files["prior"],
                     "--checkpoint", files["ckpt"], "--max-windows", "1")
    assert code == 0, err
    assert nib.load(str(out)).shape == SHAPE


def test_dicom_in_dicom_seg_out(files, capsys, tmp_path):
    from msam_core.io.dicom import read_series
    from msam_core.io.seg import read_seg
    from tests.unit.io.dicom_synth import make_ct_series

    make_ct_series(tmp_path / "ct", shape=(24, 20, 12))
    out = tmp_path / "seg.dcm"
    code, err = _run(capsys, tmp_path / "ct", "-o", out, "--point", "12,10,6",
                     "--checkpoint", files["ckpt"], "--max-windows", "1")
    assert code == 0, err
    labels = read_seg(out, read_series(tmp_path / "ct"))
    assert labels.shape == (24, 20, 12)


def test_a_folder_of_several_series_is_segmented_by_the_series_named(files, capsys, tmp_path):
    """The refusal names the option that chooses; the option reads that series; it is for DICOM only."""
    from msam_core.io.seg import read_seg
    from tests.unit.io.dicom_synth import make_ct_series

    make_ct_series(tmp_path / "up" / "a", shape=(24, 20, 12))
    b = make_ct_series(tmp_path / "up" / "b", shape=(20, 16, 8), seed=3)
    out = tmp_path / "seg.dcm"
    common = ["-o", out, "--point", "10,8,4", "--checkpoint", files["ckpt"], "--max-windows", "1"]
    code, err = _run(capsys, tmp_path / "up", *common)
    assert code == 2 and "holds 2 image series" in err and "msam segment --series-uid" in err, err
    code, err = _run(capsys, tmp_path / "up", *common, "--series-uid", b.series_uid)
    assert code == 0, err
    assert pydicom.dcmread(out).ReferencedSeriesSequence[0].SeriesInstanceUID == b.series_uid
    assert read_seg(out, load_volume(tmp_path / "up", series_uid=b.series_uid)).shape == (20, 16, 8)
    code, err = _run(capsys, files["image"], "-o", tmp_path / "m.nii.gz", "--point", "24,20,12",
                     "--checkpoint", files["ckpt"], "--series-uid", b.series_uid)
    assert code == 2 and "not DICOM: a series UID chooses among DICOM series only" in err, err


def test_dicom_in_rtstruct_out(files, capsys, tmp_path):
    """``.rtstruct.dcm`` writes an RT Structure Set whose contours give back the NIfTI mask."""
    import nibabel as nib

    from msam_core.io.dicom import read_series
    from msam_core.io.rtstruct import read_rtstruct
    from tests.unit.io.dicom_synth import make_ct_series

    make_ct_series(tmp_path / "ct", shape=(24, 20, 12))
    args = ["--point", "12,10,6", "--checkpoint", files["ckpt"], "--max-windows", "1"]
    code, err = _run(capsys, tmp_path / "ct", "-o", tmp_path / "lesion.rtstruct.dcm", *args)
    assert code == 0, err
    code, err = _run(capsys, tmp_path / "ct", "-o", tmp_path / "lesion.nii.gz", *args)
    assert code == 0, err
    from_contours = read_rtstruct(tmp_path / "lesion.rtstruct.dcm", read_series(tmp_path / "ct"))
    nifti = np.asarray(nib.load(str(tmp_path / "lesion.nii.gz")).dataobj)
    assert nifti.any() and np.array_equal(from_contours > 0, nifti > 0)


@pytest.mark.parametrize("extra, message", [
    (["--point", "24,20,99"], "outside the image"),
    (["--point", "24,20,12,0"], "no positive point"),
    (["--point", "24,20"], "expected 3 or 4 or 5 numbers"),
    (["--point", "a,b,c"], "comma-separated numbers"),
    (["--line", "20,20,12,20,20,12"], "zero length"),
    (["--line", "20,20,12,30,20,14"], "not in one slice"),
    (["--line", "20,20,12,30,20"], "expected 6 or 7 numbers"),
    (["--point", "24,20,12", "--space", "IJK"], "use voxel, LPS or RAS"),
    (["--point", "24,20,12", "--iterations", "0"], "--iterations"),
    (["--box", "0,0,0,10,10"], "--box"),
    ([], "nothing to segment"),
])
def test_prompt_mistakes_exit_2(files, capsys, extra, message):
    code, err = _run(capsys, files["image"], "-o", files["root"] / "x.nii.gz", *extra,
                     "--checkpoint", files["ckpt"])
    assert code == 2
    assert message in err and err.startswith("msam segment: error:")


def test_file_mistakes_exit_2(files, capsys, tmp_path):
    root, image, ckpt = files["root"], files["image"], files["ckpt"]
    cases = [
        ([tmp_path / "missing.nii.gz", "-o", root / "x.nii.gz", "--checkpoint", ckpt], "no such file"),
        ([image, "-o", root / "x.dcm", "--checkpoint", ckpt], "DICOM-SEG output needs a DICOM input"),
        ([image, "-o", root / "x.rtstruct.dcm", "--checkpoint", ckpt], "RTSTRUCT output needs a DICOM input"),
        ([image, "-o", root / "x.jpg", "--checkpoint", ckpt], "output must end in"),
        ([image, "-o", tmp_path / "nope" / "x.nii.gz", "--checkpoint", ckpt], "does not exist"),
        ([image, "-o", root / "x.nii.gz", "--checkpoint", tmp_path / "none.safetensors"], "checkpoint"),
    ]
    (tmp_path / "bad.nii.gz").write_bytes(b"\x00" * 100)
    cases.append(([tmp_path / "bad.nii.gz", "-o", root / "x.nii.gz", "--checkpoint", ckpt], "cannot read bad.nii.gz"))
    for argv, message in cases:
        code, err = _run(capsys, *argv, "--point", "1,1,1")
        assert code == 2, argv
        assert message in err, (argv, err)


def test_missing_default_model_names_the_file(files, capsys, tmp_path, monkeypatch):
    import msam_core.cli.segment as segment

    monkeypatch.setattr(segment, "DEFAULT_CHECKPOINT", tmp_path / "msam_default.safetensors")
    code, err = _run(capsys, files["image"], "-o", files["root"] / "x.nii.gz", "--point", "1,1,1")
    assert code == 2
    assert "msam_default.safetensors" in err and "--checkpoint PATH" in err


def test_five_d_nifti_and_metaimage_in_and_out(files, capsys, tmp_path):
    """The 5-D NIfTI of M-SAM's demo layout and the same image as MetaImage segment as the 3-D
    NIfTI does, voxel for voxel; ``-o mask.mha`` carries the input's geometry; the intensities
    line says what the values were taken to be."""
    from msam_core.io.load import load_volume
    from tests.unit.io.test_metaimage_5d import write_metaimage

    source = nib.load(str(files["image"]))
    array = np.asarray(source.dataobj)
    nib.save(nib.Nifti1Image(array.reshape(*SHAPE, 1, 1), AFFINE), str(tmp_path / "five.nii.gz"))
    write_metaimage(array, AFFINE, tmp_path / "image.mhd", compress=True)
    args = ["--point", "24,20,12", "--checkpoint", files["ckpt"], "--max-windows", "1"]
    code, err = _run(capsys, files["image"], "-o", tmp_path / "ref.nii.gz", *args)
    assert code == 0, err
    assert "intensities: " in err and "Hounsfield" in err
    reference = np.asarray(nib.load(str(tmp_path / "ref.nii.gz")).dataobj)
    code, err = _run(capsys, tmp_path / "five.nii.gz", "-o", tmp_path / "five_mask.nii.gz", *args)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "five_mask.nii.gz")).dataobj), reference)
    code, err = _run(capsys, tmp_path / "image.mhd", "-o", tmp_path / "mask.mha", *args)
    assert code == 0, err
    mask = load_volume(tmp_path / "mask.mha")
    np.testing.assert_array_equal(mask.array, reference)
    np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-5)
