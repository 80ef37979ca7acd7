"""User mistakes on the training and evaluation commands: refused at once, exit code 2, and a
message that says what is wrong - before any crop cache is built, model loaded or report written."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from msam_core.cli import main
from msam_core.errors import InvalidDataset
from msam_train.data import require_cases


def _plain_folder(root, names=("a",)):
    """A plain data folder: ``images/NAME.nii.gz`` + ``labels/NAME.nii.gz`` (8^3, one lesion)."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    label = np.zeros((8, 8, 8), np.uint8)
    label[3:5, 3:5, 3:5] = 1
    for name in names:
        nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), np.eye(4)),
                 root / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labels" / f"{name}.nii.gz")
    return root


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--data", "d", "--clicks", "0"], "argument --clicks: must be at least 1, got '0'"),
    (["evaluate", "--data", "d", "--nsd-tolerance", "-1"], "argument --nsd-tolerance: must be a finite number > 0"),
    (["calibrate", "--checkpoint", "c", "--data", "d", "--out", "o", "--clicks", "-2"],
     "argument --clicks: must be at least 1, got '-2'"),
    (["train", "--data", "d", "--steps", "0"], "argument --steps: must be at least 1"),
    (["train", "--data", "d", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["train", "--data", "d", "--iterations", "two"], "argument --iterations: expected a whole number >= 1, got 'two'"),
    (["train", "--data", "d", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["train", "--data", "d", "--lr-decoder", "0"], "argument --lr-decoder: must be a finite number > 0"),
    (["train", "--data", "d", "--weight-decay", "-0.1"], "argument --weight-decay: must be a finite number >= 0"),
    (["train", "--data", "d", "--warmup", "-1"], "argument --warmup: must be at least 0"),
    (["train", "--data", "d", "--max-minutes", "0"], "argument --max-minutes: must be a finite number > 0"),
    (["train", "--data", "d", "--seed", "-1"], "argument --seed: must be at least 0"),
    (["train", "--data", "d", "--threads", "0"], "argument --threads: must be at least 1"),
    (["train", "--data", "d", "--crops-per-lesion", "0"], "argument --crops-per-lesion: must be at least 1"),
    (["data", "synth", "--out", "o", "--seed", "-1"], "argument --seed: must be at least 0, got '-1'"),
    (["data", "synth", "--out", "o", "--train", "0"], "argument --train: must be at least 1"),
    (["compare", "a", "b", "--resamples", "0"], "argument --resamples: must be at least 1"),
])
def test_out_of_range_values_are_refused_while_parsing(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_require_cases_says_what_is_wrong_with_a_data_folder(tmp_path) -> None:
    with pytest.raises(InvalidDataset, match="data folder .*nope does not exist: give the folder 'msam data synth"):
        require_cases(tmp_path / "nope", "training")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidDataset, match="holds neither dataset.json .* nor images/ \\+ labels/"):
        require_cases(tmp_path / "empty", "training")

    msd = tmp_path / "msd"
    msd.mkdir()
    (msd / "dataset.json").write_text("{not json")
    with pytest.raises(InvalidDataset, match="is not a readable MSD dataset.json"):
        require_cases(msd, "training")
    plain = _plain_folder(tmp_path / "plain")
    entry = {"image": "../plain/images/a.nii.gz", "label": "../plain/labels/a.nii.gz"}
    (msd / "dataset.json").write_text(json.dumps({"name": "x", "training": [entry], "validation": [entry, entry],
                                                  "heldout": []}))
    with pytest.raises(InvalidDataset, match=r"has no cases in split 'real'; its splits \(cases\): training \(1\), "
                                             r"validation \(2\)$"):
        require_cases(msd, "real")
    assert [c.name for c in require_cases(msd, "validation")] == ["a", "a"]
    (msd / "dataset.json").write_text(json.dumps({"training": [entry, {"image": "./imagesTr/b.nii.gz",
                                                                       "label": "./labelsTr/b.nii.gz"}]}))
    with pytest.raises(InvalidDataset, match="1 of the 2 training cases in .* lack a file, e.g. .*imagesTr/b.nii.gz"):
        require_cases(msd, "training")

    assert [c.name for c in require_cases(plain, "training")] == ["a"]
    with pytest.raises(InvalidDataset, match="plain images/ \\+ labels/ folder, whose cases are all in the split "
                                             "'training'"):
        require_cases(plain, "validation")
    (plain / "labels" / "a.nii.gz").unlink()
    with pytest.raises(InvalidDataset, match="no image in .*images has a label of the same name"):
        require_cases(plain, "training")


def test_a_wrong_data_folder_fails_before_any_work(tmp_path, capsys) -> None:
    missing = tmp_path / "missing"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    assert f"data folder {missing} does not exist" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "run").exists()  # no crop cache, no run folder

    plain = _plain_folder(tmp_path / "plain")
    out = tmp_path / "eval"
    # the checkpoint does not exist either: the data folder is checked first, before the model loads
    assert main(["evaluate", "--data", str(plain), "--checkpoint", str(tmp_path / "no.safetensors"),
                 "--out", str(out)]) == 2
    assert "whose cases are all in the split 'training'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["calibrate", "--checkpoint", str(tmp_path / "no.safetensors"), "--data", str(plain),
                 "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "whose cases are all in the split 'training'" in capsys.readouterr().err
    assert not (plain / "cache").exists()


def test_a_folder_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path, capsys) -> None:
    plain = _plain_folder(tmp_path / "plain")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main(["train", "--data", str(plain), "--out", str(blocker / "run"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("msam train: error: ") and "Not a directory" in err and "Traceback" not in err


def test_resume_without_a_saved_step_says_it_starts_at_step_zero(tmp_path) -> None:
    from msam_train.trainer import TrainSettings, train

    plain = _plain_folder(tmp_path / "plain")
    lines: list[str] = []
    s = TrainSettings(data=str(plain), out=str(tmp_path / "run"), steps=1, batch_size=1, iterations=1,
                      crops_per_lesion=1, device="cpu", warmup=1, resume=True)
    train(s, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("--resume: no " in line and "last.pt yet, so training starts at step 0" in line for line in lines)


def test_a_split_without_lesions_is_an_error_not_an_empty_report(tmp_path, capsys) -> None:
    plain = _plain_folder(tmp_path / "plain")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), plain / "labels" / "a.nii.gz")
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(plain), "--split", "training", "--out", str(out)]) == 2
    assert "the training cases in" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
@pytest.mark.parametrize("argv", [
    ["train", "--data", "d", "--device", "cuda"],
    ["evaluate", "--data", "d", "--device", "cuda"],
    ["calibrate", "--checkpoint", "c", "--data", "d", "--out", "o", "--device", "cuda"],
    ["segment", "in.nii.gz", "-o", "out.nii.gz", "--point", "1,2,3", "--device", "cuda"],
])
def test_cuda_without_a_gpu_is_refused_before_any_work(argv, capsys) -> None:
    assert main(argv) == 2
    assert "--device cuda: no CUDA GPU is available here; use --device cpu" in capsys.readouterr().err


def test_train_names_its_devices(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "d", "--device", "gpu"])
    assert exc.value.code == 2 and "argument --device: invalid choice: 'gpu'" in capsys.readouterr().err


def test_the_other_image_control_on_a_single_lesion_is_refused_with_a_message(tmp_path, capsys) -> None:
    plain = _plain_folder(tmp_path / "plain")
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(plain), "--split", "training", "--clicks", "1", "--no-baseline",
                 "--other-image-control", "--out", str(out)]) == 2
    assert "--other-image-control needs at least two lesions" in capsys.readouterr().err and not out.exists()


def test_without_torch_the_other_commands_work_and_the_torch_ones_say_what_is_missing() -> None:
    """The API image installs no torch: ``msam hash-key`` and ``msam dicom-listener`` must still run
    there, and ``msam train`` must say why it cannot (a fresh interpreter in which torch cannot be
    imported)."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
              "from msam_core.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")
    def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, *argv], input=stdin, capture_output=True, text=True,
                              timeout=120)

    listed = run("--help")
    assert listed.returncode == 0 and "hash-key" in listed.stdout and "dicom-listener" in listed.stdout
    assert "(unavailable here: needs the package 'torch')" in listed.stdout
    key = run("hash-key", "--stdin", "tenant1", stdin="a-long-enough-secret-key-0123456789\n")
    assert key.returncode == 0 and key.stdout.startswith("tenant1:"), key.stderr
    train = run("train", "--data", "d", "--steps", "3")
    assert train.returncode == 2, train.stderr
    assert train.stderr.strip() == ("msam train: error: this command needs the Python package 'torch', which this "
                                    "installation lacks (the API image installs no torch, the worker image no "
                                    "training); run it where msam is fully installed (make install)")
    assert run("segment", "--help").returncode == 0  # imports torch only when it runs


def test_without_msam_train_the_training_commands_say_so_and_the_others_work() -> None:
    """The worker image installs msam_core and the service, not msam_train: its entry points are
    there, its package is not. ``msam train`` and the other training commands stay listed and say
    what is missing; ``msam segment`` and the service's commands work."""
    import subprocess
    import sys

    script = ("import sys\n"
              "class NotInstalled:  # as where the package is absent: 'No module named msam_train'\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'msam_train':\n"
              "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
              "sys.meta_path.insert(0, NotInstalled())\n"
              "from msam_core.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)

    listed = run("--help")
    assert listed.returncode == 0, listed.stderr
    for command in ("data", "train", "evaluate", "calibrate", "compare"):
        assert re.search(rf"^ +{command} +\(unavailable here: needs the package 'msam_train'\)", listed.stdout,
                         re.M), listed.stdout
    evaluate = run("evaluate", "--data", "d", "--checkpoint", "m.safetensors")
    assert evaluate.returncode == 2 and "needs the Python package 'msam_train'" in evaluate.stderr, evaluate.stderr
    assert run("segment", "--help").returncode == 0 and run("serve", "--help").returncode == 0


def test_evaluation_without_monai_says_which_extra_installs_it(tmp_path) -> None:
    """MONAI (the evaluation's Dice and surface Dice) comes with the train extra, not with the
    runtime set: ``msam evaluate`` without it fails at once with what to install."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['monai'] = None\n"
              "from msam_core.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-c", script, "evaluate", "--data", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("msam evaluate: error: the evaluation's metrics need the Python package 'monai'")
    assert "pip install 'msam[train]'" in done.stderr
    assert not out.exists()


def test_a_missing_module_of_our_own_is_a_bug_not_an_unavailable_command(monkeypatch) -> None:
    import msam_core.cli as cli

    monkeypatch.setitem(cli._COMMANDS, "broken", "msam_core.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="msam_core.no_such_module"):
        cli.build_parser()
    monkeypatch.setitem(cli._COMMANDS, "broken", "no_such_third_party_package.cli")
    assert "broken" in cli.build_parser().format_help()
