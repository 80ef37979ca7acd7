"""``msam evaluate`` end to end on phantoms (random network) and CLI registration."""

from __future__ import annotations

import json

import numpy as np
import pytest

import torch

from msam_core.checkpoints import save_checkpoint
from msam_core.cli import build_parser, main
from msam_core.model import build_model
from msam_core.pipeline.lines import DEFAULT_STRATEGY
from msam_train.synth import synthesize
from tests.unit.train.phantoms import phantom_scans


def test_commands_are_registered() -> None:
    parser = build_parser()
    args = parser.parse_args(["data", "synth", "--out", "x", "--seed", "3"])
    assert args.seed == 3
    args = parser.parse_args(["train", "--config", "msam_small", "--data", "d"])
    assert args.iterations == 11 and args.init is None
    args = parser.parse_args(["evaluate", "--data", "d", "--checkpoint", "c"])
    assert args.clicks == 5


def test_evaluate_writes_reports(tmp_path) -> None:
    data = tmp_path / "data"
    synthesize(data, seed=5, n_train=0, n_val=1, n_heldout=1, scans=phantom_scans(), log=lambda *_: None)
    ck = save_checkpoint(build_model("msam_small"), tmp_path / "random.safetensors")
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ck), "--split", "heldout", "--clicks", "2",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["groups"]["all"]
    assert set(stats) == {"msam", "msam_line", "region_growing", "stable_region"}
    assert len(stats["msam"]["dice"]) == 2 and all(0 <= v <= 1 for v in stats["msam"]["dice"])
    assert len(stats["msam_line"]["dice"]) == 1 and summary["line_strategy"] == DEFAULT_STRATEGY  # one interaction: the line
    rows = json.loads((out / "per_lesion.json").read_text())
    assert {r["method"] for r in rows} == {"msam", "msam_line", "region_growing", "stable_region"}
    assert {r["clicks"] for r in rows if r["method"] == "msam_line"} == {1}
    assert (out / "per_lesion.csv").read_text().startswith("split,case,lesion")
    assert (out / "dice_vs_clicks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _evaluate_random_model(tmp_path, split: str, control: str) -> tuple:
    """Phantom lesions (two validation cases or one held-out case), a random ``msam_small``, and
    ``msam evaluate --clicks 2 --no-baseline CONTROL``: ``(data, checkpoint, per-lesion rows)``."""
    data = tmp_path / "data"
    n_val, n_heldout = (2, 0) if split == "validation" else (0, 1)
    synthesize(data, seed=5, n_train=0, n_val=n_val, n_heldout=n_heldout, scans=phantom_scans(), log=lambda *_: None)
    torch.manual_seed(0)
    ck = save_checkpoint(build_model("msam_small"), tmp_path / "random.safetensors")
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ck), "--split", split, "--clicks", "2",
                 "--out", str(out), "--no-baseline", "--no-line", control]) == 0
    return data, ck, json.loads((out / "per_lesion.json").read_text())


def test_blank_image_control_runs_the_model_without_the_image(tmp_path) -> None:
    _, _, rows = _evaluate_random_model(tmp_path, "heldout", "--blank-image-control")
    assert {r["method"] for r in rows} == {"msam", "msam_blank_image"}
    by = {(r["method"], r["lesion"], r["clicks"]): r["dice"] for r in rows}
    # a random network does depend on its input: the blank crop changes at least one result
    assert any(by[("msam", lesion, c)] != by[("msam_blank_image", lesion, c)] for _, lesion, c in by)


def test_other_image_control_runs_each_lesion_on_the_next_lesions_crop(tmp_path) -> None:
    from msam_core.checkpoints import load_model
    from msam_core.io.load import load_volume
    from msam_core.pipeline.segmenter import Segmenter
    from msam_train.data import list_cases
    from msam_train.evaluate import _model_clicks, lesion_crop

    data, ck, rows = _evaluate_random_model(tmp_path, "validation", "--other-image-control")
    assert {r["method"] for r in rows} == {"msam", "msam_other_image"}
    lesions = [(r["case"], r["lesion"]) for r in rows if r["method"] == "msam" and r["clicks"] == 1]
    assert len(lesions) >= 2
    other = {(r["case"], r["lesion"], r["clicks"]): r["dice"] for r in rows if r["method"] == "msam_other_image"}
    assert len(other) == 2 * len(lesions)
    # recompute the control of the last lesion by hand: its clicks on the first lesion's crop
    loaded = load_model(ck)
    segmenter = Segmenter(loaded.network, loaded.options)
    crops = []
    for case in list_cases(data, "validation"):
        volume, labels = load_volume(case.image), load_volume(case.label).array
        for k in sorted(int(v) for v in set(labels.ravel().tolist()) if v > 0):
            crops.append(((case.name, k), lesion_crop(segmenter.sampler(volume), volume, labels == k, 128)))
    assert [name for name, _ in crops] == lesions
    (last, (_, gt, centre, grid)), (_, (first_image, *_)) = crops[-1], crops[0]
    expected = _model_clicks(segmenter, first_image, gt, centre, grid, 2, 2.0, True)
    assert [other[(*last, c)] for c in (1, 2)] == [round(d, 4) for d, _ in expected]


def test_evaluate_gives_a_coarse_view_model_its_coarse_crop(tmp_path) -> None:
    """A checkpoint with ``coarse_view`` is evaluated as the pipeline runs it: each lesion's crop
    plus the same place at twice the spacing."""
    from msam_core.checkpoints import load_model
    from msam_core.io.load import load_volume
    from msam_core.pipeline.options import PipelineOptions
    from msam_core.pipeline.segmenter import Segmenter
    from msam_train.data import list_cases
    from msam_train.evaluate import _model_clicks, coarse_crop, lesion_crop

    data = tmp_path / "data"
    synthesize(data, seed=5, n_train=0, n_val=0, n_heldout=1, scans=phantom_scans(), log=lambda *_: None)
    torch.manual_seed(0)
    ck = save_checkpoint(build_model("msam_small"), tmp_path / "coarse.safetensors",
                         options=PipelineOptions(coarse_view=True))
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ck), "--split", "heldout", "--clicks", "2",
                 "--out", str(out), "--no-baseline"]) == 0
    rows = json.loads((out / "per_lesion.json").read_text())
    loaded = load_model(ck)
    assert loaded.options.coarse_view is True  # the option travels in the checkpoint
    segmenter = Segmenter(loaded.network, loaded.options)
    case = list_cases(data, "heldout")[0]
    volume, labels = load_volume(case.image), load_volume(case.label).array
    k = min(int(v) for v in set(labels.ravel().tolist()) if v > 0)
    sampler = segmenter.sampler(volume)
    image, gt, centre, grid = lesion_crop(sampler, volume, labels == k, 128)
    coarse = coarse_crop(segmenter, sampler, grid)
    assert coarse is not None and coarse.shape == image.shape
    expected = _model_clicks(segmenter, image, gt, centre, grid, 2, 2.0, True, coarse_image=coarse)
    got = {r["clicks"]: r["dice"] for r in rows if r["lesion"] == k and r["case"] == case.name and r["method"] == "msam"}
    assert [got[c] for c in (1, 2)] == [round(d, 4) for d, _ in expected]


def _one_validation_case_and_a_random_model(tmp_path) -> tuple:
    """One phantom validation case and a random ``msam_small`` checkpoint: ``(data, checkpoint)``."""
    data = tmp_path / "data"
    synthesize(data, seed=5, n_train=0, n_val=1, n_heldout=0, scans=phantom_scans(), log=lambda *_: None)
    torch.manual_seed(0)
    return data, save_checkpoint(build_model("msam_small"), tmp_path / "random.safetensors")


def test_calibrate_keeps_the_best_threshold_on_validation(tmp_path) -> None:
    """``msam calibrate`` runs the click protocol per threshold and writes the best into a copy."""
    from msam_core.checkpoints import load_checkpoint, load_model

    data, ck = _one_validation_case_and_a_random_model(tmp_path)
    out = tmp_path / "calibrated.safetensors"
    assert main(["calibrate", "--checkpoint", str(ck), "--data", str(data), "--clicks", "2",
                 "--thresholds", "-40", "0", "40", "--out", str(out)]) == 0
    model = load_model(out)
    calibration = model.meta["provenance"]["calibration"]
    table = {float(t): v["mean_dice"] for t, v in calibration["table"].items()}
    assert set(table) == {-40.0, 0.0, 40.0}
    assert table[40.0] == 0.0  # no logit of a random model reaches 40: empty masks
    assert model.options.mask_threshold == calibration["mask_threshold"] == max(table, key=lambda t: (table[t], -abs(t)))
    original = load_checkpoint(ck)
    for (name, a), b in zip(original.state_dict().items(), model.network.state_dict().values()):
        assert torch.equal(a, b), name  # weights unchanged


def test_calibrate_chooses_the_prior_weights_on_validation(tmp_path) -> None:
    """``--prior-weights``: one click-protocol run per pair at the chosen threshold; the best pair
    (ties: the smaller total) is written into the copy, and evaluate's masks then include it."""
    from msam_core.checkpoints import load_model

    data = tmp_path / "data"
    synthesize(data, seed=5, n_train=0, n_val=2, n_heldout=0, scans=phantom_scans(), log=lambda *_: None)
    torch.manual_seed(0)
    ck = save_checkpoint(build_model("msam_small"), tmp_path / "random.safetensors")
    out = tmp_path / "calibrated.safetensors"
    assert main(["calibrate", "--checkpoint", str(ck), "--data", str(data), "--clicks", "2", "--thresholds", "0",
                 "--prior-weights", "0,0", "1000,0", "1000,1000", "--prior-max-voxels", "9000", "--out", str(out)]) == 0
    model = load_model(out)
    calibration = model.meta["provenance"]["calibration"]
    table = {tuple(float(v) for v in k.split(",")): v for k, v in calibration["prior_table"].items()}
    assert set(table) == {(0.0, 0.0), (1000.0, 0.0), (1000.0, 1000.0)}
    # pair (1000, 0) changes the first click only: the same second click as (0, 0) would need
    # the same first mask, so only Dice@1 is compared with the random network's own
    assert table[(1000.0, 0.0)]["dice"][0] != table[(0.0, 0.0)]["dice"][0]
    # the best pair replaces the checkpoint's own (0,0) only when its interval says it is better
    best = max(table, key=lambda w: (table[w]["mean_dice"], -sum(w)))
    choice = calibration["prior_choice"]
    assert choice["incumbent"] == "0,0" and choice["best"] == f"{best[0]:g},{best[1]:g}"
    chosen = best if best == (0.0, 0.0) or choice["interval"][0] > 0 else (0.0, 0.0)
    assert choice["chosen"] == f"{chosen[0]:g},{chosen[1]:g}"
    assert (model.options.prior_weight_first, model.options.prior_weight) == chosen
    assert (calibration["prior_weight_first"], calibration["prior_weight"]) == chosen
    assert model.options.prior_max_voxels == calibration["prior_max_voxels"] == 9000  # the bound they were chosen at
    assert model.options.mask_threshold == 0.0


def test_calibrate_chooses_the_boundary_bands_on_validation(tmp_path) -> None:
    """``--boundary-bands``: one click-protocol run per pair, after the threshold; the rule against
    the checkpoint's own pair as for the prior; the chosen pair is written into the copy."""
    from msam_core.checkpoints import load_model

    data = tmp_path / "data"
    synthesize(data, seed=5, n_train=0, n_val=2, n_heldout=0, scans=phantom_scans(), log=lambda *_: None)
    torch.manual_seed(0)
    ck = save_checkpoint(build_model("msam_small"), tmp_path / "random.safetensors")
    out = tmp_path / "calibrated.safetensors"
    # a random network's masks are empty or fill the crop; a dominant prior gives masks of the
    # lesions' size for the bands to refine
    assert main(["calibrate", "--checkpoint", str(ck), "--data", str(data), "--clicks", "2", "--thresholds", "0",
                 "--prior-weights", "1000,1000", "--boundary-bands", "0,0", "3,0", "2,2", "--out", str(out)]) == 0
    model = load_model(out)
    calibration = model.meta["provenance"]["calibration"]
    table = {tuple(int(v) for v in k.split(",")): v for k, v in calibration["boundary_table"].items()}
    assert set(table) == {(0, 0), (3, 0), (2, 2)}
    assert table[(3, 0)]["dice"][0] != table[(0, 0)]["dice"][0]  # the first click's band changes its mask
    choice = calibration["boundary_choice"]
    best = max(table, key=lambda b: (table[b]["mean_dice"], -sum(b)))
    assert choice["incumbent"] == "0,0" and choice["best"] == f"{best[0]},{best[1]}"
    chosen = best if best == (0, 0) or choice["interval"][0] > 0 else (0, 0)
    assert (model.options.boundary_band_first, model.options.boundary_band) == chosen
    assert (calibration["boundary_band_first"], calibration["boundary_band"]) == chosen
    assert (model.options.prior_weight_first, model.options.prior_weight) == (1000.0, 1000.0)


def test_a_new_prior_pair_must_be_clearly_better_than_the_checkpoints_own() -> None:
    from msam_train.calibrate import choose_over_incumbent

    lesions = [("validation", f"case{i}", "1") for i in range(12)]
    rng = np.random.default_rng(0)
    base = {k: {1: 0.5 + 0.1 * rng.standard_normal(), 2: 0.6} for k in lesions}
    noisy = {k: {1: v[1] + (0.01 if i % 2 else -0.008), 2: 0.6} for i, (k, v) in enumerate(base.items())}
    clear = {k: {1: v[1] + 0.05 + 0.01 * (i % 3), 2: 0.62} for i, (k, v) in enumerate(base.items())}

    def table(runs):
        return {w: {"mean_dice": float(np.mean([np.mean(list(d.values())) for d in r.values()]))}
                for w, r in runs.items()}

    # a higher mean that is lesion-to-lesion noise: the incumbent stays, the decision says why
    runs = {(4.0, 2.0): base, (2.0, 2.0): noisy}
    pair, choice = choose_over_incumbent(table(runs), runs, (4.0, 2.0))
    assert table(runs)[(2.0, 2.0)]["mean_dice"] > table(runs)[(4.0, 2.0)]["mean_dice"]
    assert pair == (4.0, 2.0) and choice["best"] == "2,2" and choice["chosen"] == "4,2"
    assert choice["interval"][0] <= 0 < choice["difference"]
    # a gain on every lesion replaces it
    runs = {(4.0, 2.0): base, (8.0, 2.0): clear}
    pair, choice = choose_over_incumbent(table(runs), runs, (4.0, 2.0))
    assert pair == (8.0, 2.0) and choice["chosen"] == "8,2" and choice["interval"][0] > 0
    # the incumbent best: nothing to compare
    pair, choice = choose_over_incumbent(table(runs), runs, (8.0, 2.0))
    assert pair == (8.0, 2.0) and "interval" not in choice


def test_calibrate_refuses_a_malformed_prior_weight_pair(tmp_path, capsys) -> None:
    import pytest

    for bad, says in (("8", "FIRST,LATER"), ("8,x", "FIRST,LATER"), ("1,-2", "finite and >= 0"),
                      ("nan,1", "finite and >= 0")):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "--checkpoint", "x.safetensors", "--data", str(tmp_path), "--prior-weights", bad,
                  "--out", str(tmp_path / "o.safetensors")])
        assert exc.value.code == 2
        assert says in capsys.readouterr().err
    for bad, says in (("2", "FIRST,LATER"), ("1.5,2", "whole numbers"), ("0,-1", ">= 0 voxels")):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "--checkpoint", "x.safetensors", "--data", str(tmp_path), "--boundary-bands", bad,
                  "--out", str(tmp_path / "o.safetensors")])
        assert exc.value.code == 2
        assert says in capsys.readouterr().err
    for bad, says in (("0", "at least 1 voxel"), ("2e4", "whole number of voxels")):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "--checkpoint", "x.safetensors", "--data", str(tmp_path), "--prior-weights",
                  "--prior-max-voxels", bad, "--out", str(tmp_path / "o.safetensors")])
        assert exc.value.code == 2
        assert says in capsys.readouterr().err


def test_calibrate_sets_the_coarse_view_and_records_both_scores(tmp_path) -> None:
    from msam_core.checkpoints import load_model

    data, ck = _one_validation_case_and_a_random_model(tmp_path)
    out = tmp_path / "coarse.safetensors"
    assert main(["calibrate", "--checkpoint", str(ck), "--data", str(data), "--clicks", "2", "--thresholds", "0",
                 "--coarse-view", "on", "--out", str(out)]) == 0
    model = load_model(out)
    assert model.options.coarse_view is True and load_model(ck).options.coarse_view is False
    record = model.meta["provenance"]["calibration"]["coarse_view"]
    assert record["coarse_view"] is True and set(record["table"]) == {"off", "on"}
    off, on = record["table"]["off"], record["table"]["on"]
    assert len(off["dice"]) == len(on["dice"]) == 2
    assert record["difference"] == pytest.approx(on["mean_dice"] - off["mean_dice"], abs=2e-4)
    low, high = record["interval"]
    assert low <= record["difference"] <= high
    # with the view off, the checkpoint's scores are the threshold scan's at 0: the same protocol
    assert off["mean_dice"] == model.meta["provenance"]["calibration"]["table"]["0"]["mean_dice"]


def test_evaluate_refuses_a_report_folder_it_cannot_write_before_the_work(tmp_path, capsys) -> None:
    """An --out that cannot be made is refused before the model loads (exit 2, one line), not
    after every lesion was evaluated; the summary line gives each NSD once."""
    data, ck = _one_validation_case_and_a_random_model(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ck), "--clicks", "1", "--no-baseline",
                 "--out", str(blocked / "reports")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to {blocked / 'reports'}: {blocked} is not a folder" in err and "choose another --out" in err, err
    assert blocked.read_text() == "not a folder"
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ck), "--clicks", "1", "--no-baseline",
                 "--no-line", "--out", str(tmp_path / "ok")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("msam:"))
    assert line.count("NSD@1") == 1 and ", @1 " not in line, line
