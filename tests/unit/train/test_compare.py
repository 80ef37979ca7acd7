"""``msam compare``: paired per-lesion differences of two evaluate reports, with a bootstrap interval."""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import pytest

from msam_core.cli import main
from msam_core.errors import MsamError
from msam_train.compare import compare, read_dice, verdict
from msam_train.evaluate import Row


def write_report(folder: Path, dice: dict[tuple[str, str], list[float]]) -> Path:
    """An evaluate-style ``per_lesion.csv``: ``{(method, case): [Dice@1, Dice@2, ...]}``."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "per_lesion.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        for (method, case), values in dice.items():
            for clicks, d in enumerate(values, start=1):
                writer.writerow(asdict(Row("validation", case, 1, "src", "CT", "liver", 10.0, 100,
                                           method, clicks, d, d)))
    return folder


def test_constant_gain_has_a_degenerate_interval_and_says_b_is_better(tmp_path) -> None:
    a = write_report(tmp_path / "a", {("msam", f"c{i}"): [0.1 * i, 0.2] for i in range(4)})
    b = write_report(tmp_path / "b", {("msam", f"c{i}"): [0.1 * i + 0.25, 0.2] for i in range(4)})
    rows = compare(read_dice(a, "msam"), read_dice(b, "msam"), resamples=200)
    assert [r.label for r in rows] == ["Dice@1", "Dice@2", "mean Dice@1..2"]
    one, two, mean = rows
    assert one.mean_a == pytest.approx(0.15) and one.mean_b == pytest.approx(0.40)
    assert (one.diff, one.low, one.high) == pytest.approx((0.25, 0.25, 0.25))
    assert (two.diff, two.low, two.high) == pytest.approx((0.0, 0.0, 0.0))
    assert mean.diff == pytest.approx(0.125)
    assert verdict(one) == "B better" and verdict(two) == "no evidence of a difference"


def test_gains_and_losses_that_cancel_give_an_interval_around_zero(tmp_path) -> None:
    a = write_report(tmp_path / "a", {("msam", f"c{i}"): [0.5] for i in range(20)})
    b = write_report(tmp_path / "b", {("msam", f"c{i}"): [0.7 if i % 2 else 0.3] for i in range(20)})
    one, mean = compare(read_dice(a, "msam"), read_dice(b, "msam"), resamples=2000, seed=1)
    assert one.diff == pytest.approx(0.0)
    assert -0.2 <= one.low < 0 < one.high <= 0.2
    assert verdict(one) == "no evidence of a difference"
    assert (mean.diff, mean.low, mean.high) == pytest.approx((one.diff, one.low, one.high))


def test_two_methods_of_one_report(tmp_path) -> None:
    report = write_report(tmp_path / "r", {**{("msam", f"c{i}"): [0.6, 0.7] for i in range(3)},
                                            **{("region_growing", f"c{i}"): [0.4, 0.1] for i in range(3)}})
    rows = compare(read_dice(report, "region_growing"), read_dice(report, "msam"), resamples=100)
    assert [round(r.diff, 6) for r in rows] == [0.2, 0.6, 0.4]
    assert all(verdict(r) == "B better" for r in rows)


def test_mismatched_reports_are_refused_with_what_to_do(tmp_path) -> None:
    a = write_report(tmp_path / "a", {("msam", "c0"): [0.5, 0.5], ("msam", "c1"): [0.5, 0.5]})
    other_lesions = write_report(tmp_path / "b", {("msam", "c0"): [0.5, 0.5], ("msam", "c9"): [0.5, 0.5]})
    fewer_clicks = write_report(tmp_path / "c", {("msam", "c0"): [0.5], ("msam", "c1"): [0.5]})
    with pytest.raises(MsamError, match="1 only in A, 1 only in B.*same data folder and split"):
        compare(read_dice(a, "msam"), read_dice(other_lesions, "msam"))
    assert len(compare(read_dice(a, "msam"), read_dice(fewer_clicks, "msam"), resamples=10)) == 2  # Dice@1 + mean
    with pytest.raises(MsamError, match="no rows for method 'region_growing'; it has msam"):
        read_dice(a, "region_growing")
    with pytest.raises(MsamError, match="does not exist"):
        read_dice(tmp_path / "missing", "msam")


def test_cli_prints_the_table_and_exits_2_on_a_user_mistake(tmp_path, capsys) -> None:
    a = write_report(tmp_path / "a", {("msam", f"c{i}"): [0.2, 0.4] for i in range(3)})
    b = write_report(tmp_path / "b", {("msam", f"c{i}"): [0.3, 0.6] for i in range(3)})
    assert main(["compare", str(a), str(b), "--resamples", "50"]) == 0
    out = capsys.readouterr().out
    assert "3 paired lesions" in out and "a bootstrap interval this small is rough" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("Dice@2"))
    assert "+0.200" in line and "B better" in line
    assert main(["compare", str(a), str(b), "--method-b", "nnunet"]) == 2
    assert "no rows for method 'nnunet'" in capsys.readouterr().err
