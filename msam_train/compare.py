"""``msam compare``: is one model (or method) really better than another on the same lesions?

Two ``msam evaluate`` reports on one split differ by a few hundredths of Dice between any two
checkpoints of a run; on two dozen lesions that is mostly which lesions happen to suit which
model. This command pairs the lesions of report A with those of report B (same split, case and
lesion), takes the per-lesion difference ``B - A`` of Dice after each click count and of the
mean over clicks 1..N, and gives the mean difference with a paired bootstrap 95% interval
(lesions resampled with replacement). An interval that contains 0 says: no evidence either
way - do not ship the change on that figure.

The two sides may also be two methods of one report (``--method-a region_growing --method-b
msam`` on the same folder: does msam beat region growing from the same clicks?).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msam_core.cli.arguments import whole_number
from msam_core.errors import MsamError

Lesion = tuple[str, str, str]  # (split, case, lesion)


@dataclass(frozen=True)
class Difference:
    """Mean of A, mean of B, mean of ``B - A`` and its bootstrap interval, over paired lesions."""

    label: str
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float


def read_dice(report: Path, method: str) -> dict[Lesion, dict[int, float]]:
    """``report/per_lesion.csv`` -> ``{(split, case, lesion): {clicks: dice}}`` for one method."""
    path = Path(report) / "per_lesion.csv" if Path(report).is_dir() else Path(report)
    if not path.is_file():
        raise MsamError(f"{path} does not exist: give an 'msam evaluate --out' folder or its per_lesion.csv")
    table: dict[Lesion, dict[int, float]] = {}
    methods: set[str] = set()
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            methods.add(row["method"])
            if row["method"] == method:
                table.setdefault((row["split"], row["case"], row["lesion"]), {})[int(row["clicks"])] = float(row["dice"])
    if not table:
        raise MsamError(f"{path} has no rows for method {method!r}; it has {', '.join(sorted(methods)) or 'none'}")
    return table


def compare(a: dict[Lesion, dict[int, float]], b: dict[Lesion, dict[int, float]], resamples: int = 5000,
            seed: int = 0) -> list[Difference]:
    """Paired differences ``B - A`` after each click count and over clicks 1..N (last row)."""
    if set(a) != set(b):
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        raise MsamError(f"the reports hold different lesions ({only_a} only in A, {only_b} only in B): "
                        "evaluate both on the same data folder and split")
    lesions = sorted(a)
    clicks = sorted(set.intersection(*(set(a[k]) & set(b[k]) for k in lesions)))
    if not clicks or clicks != list(range(1, clicks[-1] + 1)):
        raise MsamError("the reports do not share click counts 1..N: evaluate both with the same --clicks")
    if resamples < 1:
        raise MsamError("--resamples must be at least 1")
    va = np.array([[a[k][c] for c in clicks] for k in lesions])  # [lesions, clicks]
    vb = np.array([[b[k][c] for c in clicks] for k in lesions])
    va = np.concatenate([va, va.mean(1, keepdims=True)], axis=1)
    vb = np.concatenate([vb, vb.mean(1, keepdims=True)], axis=1)
    diff = vb - va
    picks = np.random.default_rng(seed).integers(0, len(lesions), size=(resamples, len(lesions)))
    boot = diff[picks].mean(axis=1)  # [resamples, clicks + 1]
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    labels = [f"Dice@{c}" for c in clicks] + [f"mean Dice@1..{clicks[-1]}"]
    return [Difference(lab, float(va[:, i].mean()), float(vb[:, i].mean()), float(diff[:, i].mean()),
                       float(low[i]), float(high[i])) for i, lab in enumerate(labels)]


def direction(d: Difference) -> int:
    """+1: B better (the interval lies above 0), -1: A better (below 0), 0: no evidence either way."""
    return 1 if d.low > 0 else -1 if d.high < 0 else 0


def verdict(d: Difference) -> str:
    return {1: "B better", -1: "A better", 0: "no evidence of a difference"}[direction(d)]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paired comparison of two evaluate reports (bootstrap 95%% interval)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="report A: an 'msam evaluate --out' folder (the reference)")
    p.add_argument("b", type=Path, help="report B: the candidate (may be the same folder as A)")
    p.add_argument("--method-a", default="msam", help="method of report A (default msam)")
    p.add_argument("--method-b", default="msam", help="method of report B (default msam)")
    p.add_argument("--resamples", type=whole_number(1), default=5000, help="bootstrap resamples (default 5000)")
    p.add_argument("--seed", type=whole_number(0), default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    a = read_dice(args.a, args.method_a)
    b = read_dice(args.b, args.method_b)
    rows = compare(a, b, args.resamples, args.seed)
    print(f"A = {args.method_a} in {args.a}; B = {args.method_b} in {args.b}; {len(a)} paired lesions")
    print(f"{'':<18}{'A':>7}{'B':>7}{'B - A':>8}   95% interval")
    for d in rows:
        print(f"{d.label:<18}{d.mean_a:7.3f}{d.mean_b:7.3f}{d.diff:+8.3f}   [{d.low:+.3f}, {d.high:+.3f}]  {verdict(d)}")
    if len(a) < 10:
        print(f"only {len(a)} lesions: a bootstrap interval this small is rough; read it as a sanity check")
    return 0
