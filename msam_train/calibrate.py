"""``msam calibrate``: choose a trained model's decision threshold on validation lesions.

A model trained with soft Dice + cross-entropy need not be best at ``sigmoid > 0.5``: a model
unsure of a lesion's extent after one click may draw a blob too small for most lesions, which a
lower logit threshold fits better. This command runs
:mod:`msam_train.evaluate`'s click protocol (first click at the deepest voxel, each next
one in the largest error, previous logits fed back) on a split - **validation**, never the
data the model is judged on - once per candidate threshold, and keeps the threshold with the
highest mean Dice over clicks 1..N (the area under the Dice-versus-clicks curve, so one-click
and multi-click results both count); ties go to the threshold nearest 0.

The threshold is written into a copy of the checkpoint (``PipelineOptions.mask_threshold``, with
the table of scores in the provenance); the weights are unchanged. Every user of the model
(``msam segment``, the worker, ``msam evaluate``) then decides at it, because their
:class:`~msam_core.pipeline.segmenter.Segmenter` is built from the checkpoint's options and
returns logits minus the threshold.

``--prior-weights``: then, at the chosen threshold, the same protocol once per candidate pair of
weights of the stable-region prior (:mod:`msam_core.pipeline.region_prior`: one for a lesion
prompted by one positive click, one after further clicks). The checkpoint's own pair is always
among them, and the pair with the highest mean Dice (ties: the smaller total weight) replaces it
only when it is clearly better: its paired bootstrap 95% interval of the mean Dice difference over
the lesions (:func:`~msam_train.compare.compare`) lies above 0; a few thousandths on two
dozen lesions is which lesions suit which pair, not a better pair. Written as
``PipelineOptions.prior_weight_first`` and ``prior_weight``, used by
:meth:`~msam_core.pipeline.segmenter.Segmenter.click`. The weights are chosen at one
bound on the stable region's size (``--prior-max-voxels``, default
:data:`~msam_core.pipeline.region_prior.MAX_VOXELS`), written with them as
``PipelineOptions.prior_max_voxels``.

``--boundary-bands``: last, with the chosen prior, the same once per candidate pair of bands of
the full-resolution boundary refinement (:mod:`msam_core.pipeline.boundary`: half-widths in
voxels of the band a random walker decides, 0 = off; one for one positive click, one after
further clicks), with the same rule against the checkpoint's own pair. Written as
``PipelineOptions.boundary_band_first`` and ``boundary_band``.

``--coarse-view on|off``: last, set whether the pipeline also looks at twice the spacing
(:mod:`msam_core.pipeline.coarse_view`; ``PipelineOptions.coarse_view``). This one is set, not chosen:
the protocol runs once with it off and once on at the settings above, and both scores, with the
paired interval of on minus off, go into the provenance for whoever reads the choice.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from msam_core.cli.arguments import whole_number
from msam_core.errors import InvalidCheckpoint
from msam_core.pipeline.region_prior import MAX_VOXELS

#: Candidate thresholds (logits): sigmoid 0.05 .. 0.73.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(-3.0, 1.01, 0.5), 2))
#: Candidate ``(first, later)`` weights of the stable-region prior (``--prior-weights``).
DEFAULT_PRIOR_WEIGHTS: tuple[tuple[float, float], ...] = ((0, 0), (2, 2), (4, 2), (8, 2), (8, 0), (4, 4))
#: Candidate ``(first, later)`` bands of the boundary refinement (``--boundary-bands``).
DEFAULT_BOUNDARY_BANDS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (3, 3), (0, 2), (1, 2))


def set_threshold(model, threshold: float) -> None:
    """Set ``model``'s (a :class:`~msam_core.checkpoints.LoadedModel`) decision threshold
    (``PipelineOptions.mask_threshold``) in place."""
    model.options = replace(model.options, mask_threshold=float(threshold))


def set_prior_weights(model, first: float, later: float, max_voxels: int | None = None) -> None:
    """Set ``model``'s stable-region prior weights (``PipelineOptions.prior_weight_first``,
    ``prior_weight``) and, when given, its bound (``prior_max_voxels``) in place."""
    bound = {} if max_voxels is None else {"prior_max_voxels": max_voxels}
    model.options = replace(model.options, prior_weight_first=float(first), prior_weight=float(later), **bound)


def set_boundary_bands(model, first: int, later: int) -> None:
    """Set ``model``'s boundary-refinement bands (``PipelineOptions.boundary_band_first``,
    ``boundary_band``) in place."""
    model.options = replace(model.options, boundary_band_first=int(first), boundary_band=int(later))


def set_coarse_view(model, on: bool) -> None:
    """Turn ``model``'s coarse view (``PipelineOptions.coarse_view``) on or off in place."""
    model.options = replace(model.options, coarse_view=bool(on))


def measure_coarse_view(model, data_dir: Path, on: bool, split: str = "validation", clicks: int = 5,
                        device: str = "cpu", log=print) -> dict:
    """Run the protocol with the coarse view off and on, leave ``model`` at ``on`` and return the
    record for the provenance: ``{"coarse_view", "table": {"off"|"on": {"mean_dice", "dice"}},
    "difference", "interval"}`` (on minus off, paired bootstrap 95% over the lesions)."""
    from msam_core.pipeline.segmenter import DictEmbeddingCache
    from msam_train.compare import compare

    per_lesion: dict = {}
    table = _scan(model, [False, True], set_coarse_view, data_dir, split, clicks, device,
                  DictEmbeddingCache(max_items=100_000), log, lambda v: f"coarse view {'on' if v else 'off'}",
                  per_lesion)
    d = compare(per_lesion[False], per_lesion[True])[-1]
    set_coarse_view(model, on)
    log(f"coarse view on minus off: {d.diff:+.4f} mean Dice (95% interval {d.low:+.4f} to {d.high:+.4f}); "
        f"set {'on' if on else 'off'}")
    return {"coarse_view": bool(on), "table": {("on" if k else "off"): v for k, v in table.items()},
            "difference": round(d.diff, 4), "interval": [round(d.low, 4), round(d.high, 4)]}


def _scan(model, candidates: list, apply, data_dir: Path, split: str, clicks: int, device: str, embeddings,
          log, label, per_lesion: dict | None = None) -> dict:
    """Run the click protocol once per candidate (``apply(model, candidate)`` first) -> ``{candidate:
    {"mean_dice": m, "dice": [Dice@1..N]}}``; ``per_lesion``, when given, gets each candidate's
    per-lesion Dice (:func:`~msam_train.compare.read_dice`)."""
    from msam_train.compare import read_dice
    from msam_train.evaluate import evaluate

    table: dict = {}
    for key in candidates:
        apply(model, key)
        with tempfile.TemporaryDirectory(prefix="msam-calibrate-") as tmp:
            summary = evaluate(Path(data_dir), None, split, clicks, Path(tmp) if per_lesion is not None else None,
                               device=device, baseline=False, model=model, log=lambda *_: None,
                               embedding_cache=embeddings, line=False)
            if per_lesion is not None:
                per_lesion[key] = read_dice(Path(tmp), "msam")
        dice = [round(float(v), 4) for v in summary["groups"]["all"]["msam"]["dice"]]
        table[key] = {"mean_dice": round(float(np.mean(dice)), 4), "dice": dice}
        log(f"{label(key)}: mean Dice {table[key]['mean_dice']:.4f} (" +
            " ".join(f"@{i + 1} {d:.3f}" for i, d in enumerate(dice)) + f") on {summary['lesions']} {split} lesions")
    return table


def calibrate(model, data_dir: Path, split: str = "validation", clicks: int = 5,
              thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS, device: str = "cpu", log=print) -> tuple[float, dict]:
    """``-> (best threshold, {threshold: {"mean_dice": m, "dice": [Dice@1..N]}})``; ``model`` is
    left at the best threshold."""
    from msam_core.pipeline.segmenter import DictEmbeddingCache

    if not thresholds:
        raise ValueError("give at least one threshold")
    embeddings = DictEmbeddingCache(max_items=100_000)  # the threshold changes no embedding: encode once
    table = _scan(model, [float(t) for t in thresholds], set_threshold, data_dir, split, clicks, device, embeddings,
                  log, lambda t: f"threshold {t:+.2f}")
    best = max(table, key=lambda t: (table[t]["mean_dice"], -abs(t)))
    set_threshold(model, best)
    return best, table


def pair_label(pair: tuple[float, float]) -> str:
    """``(8.0, 2.0)`` -> ``"8,2"`` (as on the command line and in the provenance)."""
    return f"{pair[0]:g},{pair[1]:g}"


def choose_over_incumbent(table: dict, per_lesion: dict,
                          incumbent: tuple[float, float]) -> tuple[tuple[float, float], dict]:
    """The pair to keep: the best of ``table`` (ties: the smaller total) if its paired interval of
    mean Dice over the ``incumbent`` (``per_lesion``: each pair's per-lesion Dice) lies above 0,
    else the incumbent. ``-> (pair, decision)``, the decision for the provenance: ``{"incumbent",
    "best", "chosen"[, "difference", "interval"]}`` (pairs as labels)."""
    from msam_train.compare import compare, direction

    best = chosen = max(table, key=lambda w: (table[w]["mean_dice"], -sum(w)))
    choice: dict = {"incumbent": pair_label(incumbent), "best": pair_label(best)}
    if best != incumbent:
        d = compare(per_lesion[incumbent], per_lesion[best])[-1]
        choice.update(difference=round(d.diff, 4), interval=[round(d.low, 4), round(d.high, 4)])
        if direction(d) <= 0:
            chosen = incumbent
    choice["chosen"] = pair_label(chosen)
    return chosen, choice


def _calibrate_pair(model, candidates: list, incumbent: tuple, apply, what: str, data_dir: Path, split: str,
                    clicks: int, device: str, log) -> tuple[tuple, dict, dict]:
    """Scan ``candidates`` (``(first, later)`` settings; ``apply(model, pair)`` sets one) plus the
    model's own ``incumbent``, keep the best only when clearly better (:func:`choose_over_incumbent`)
    and leave ``model`` at the chosen pair. ``-> (chosen pair, table, decision)``. Every pair is
    applied once before the scan, so an invalid one raises ``ValueError`` before minutes of work."""
    from msam_core.pipeline.segmenter import DictEmbeddingCache

    candidates = list(dict.fromkeys(candidates + [incumbent]))
    options = model.options
    for pair in candidates:
        apply(model, pair)
    model.options = options
    per_lesion: dict = {}
    table = _scan(model, candidates, apply, data_dir, split, clicks, device, DictEmbeddingCache(max_items=100_000),
                  log, lambda pair: f"{what} {pair_label(pair)}", per_lesion)
    chosen, choice = choose_over_incumbent(table, per_lesion, incumbent)
    if choice["chosen"] != choice["best"]:
        low, high = choice["interval"]
        log(f"{what} {choice['best']}: {choice['difference']:+.4f} mean Dice over the checkpoint's own "
            f"{choice['incumbent']} (95% interval {low:+.4f} to {high:+.4f}): no clear gain, {choice['incumbent']} kept")
    apply(model, chosen)
    return chosen, table, choice


def calibrate_prior(model, data_dir: Path, split: str = "validation", clicks: int = 5,
                    weights: tuple[tuple[float, float], ...] = DEFAULT_PRIOR_WEIGHTS, device: str = "cpu",
                    log=print, max_voxels: int = MAX_VOXELS) -> tuple[tuple[float, float], dict, dict]:
    """Like :func:`calibrate`, for the stable-region prior's ``(first, later)`` weights at the
    model's threshold and the bound ``max_voxels``. The model's own pair is scanned too, and kept
    unless the best pair is clearly better (:func:`choose_over_incumbent`). ``-> (chosen pair,
    table, decision)``; ``model`` is left at the chosen pair and that bound. A negative or
    non-finite weight, or a bound below 1, raises ``ValueError`` (``PipelineOptions``)."""
    if not weights:
        raise ValueError("give at least one pair of prior weights")
    incumbent = (float(model.options.prior_weight_first), float(model.options.prior_weight))
    return _calibrate_pair(model, [(float(a), float(b)) for a, b in weights], incumbent,
                           lambda m, w: set_prior_weights(m, *w, max_voxels=max_voxels), "prior weights",
                           data_dir, split, clicks, device, log)


def calibrate_boundary(model, data_dir: Path, split: str = "validation", clicks: int = 5,
                       bands: tuple[tuple[int, int], ...] = DEFAULT_BOUNDARY_BANDS, device: str = "cpu",
                       log=print) -> tuple[tuple[int, int], dict, dict]:
    """Like :func:`calibrate_prior`, for the boundary refinement's ``(first, later)`` bands at the
    model's threshold and prior. ``-> (chosen pair, table, decision)``; ``model`` is left at the
    chosen pair. A negative band raises ``ValueError`` (``PipelineOptions``)."""
    if not bands:
        raise ValueError("give at least one pair of boundary bands")
    incumbent = (int(model.options.boundary_band_first), int(model.options.boundary_band))
    return _calibrate_pair(model, [(int(a), int(b)) for a, b in bands], incumbent,
                           lambda m, b: set_boundary_bands(m, *b), "boundary bands", data_dir, split, clicks,
                           device, log)


def parse_weight_pair(text: str) -> tuple[float, float]:
    """``"FIRST,LATER"`` -> ``(first, later)`` (argparse type)."""
    try:
        first, later = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST,LATER (two numbers, e.g. 8,2), got {text!r}") from None
    if not (np.isfinite([first, later]).all() and min(first, later) >= 0):
        raise argparse.ArgumentTypeError(f"prior weights must be finite and >= 0, got {text!r}")
    return first, later


def parse_band_pair(text: str) -> tuple[int, int]:
    """``"FIRST,LATER"`` -> ``(first, later)`` whole numbers of voxels >= 0 (argparse type)."""
    try:
        first, later = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST,LATER (two whole numbers of voxels, e.g. 0,2), "
                                         f"got {text!r}") from None
    if min(first, later) < 0:
        raise argparse.ArgumentTypeError(f"boundary bands must be >= 0 voxels, got {text!r}")
    return first, later


def parse_voxels(text: str) -> int:
    """A region bound in voxels, a whole number >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of voxels (e.g. 20000), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the bound must be at least 1 voxel, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="choose a model's decision threshold on validation lesions",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="msam .safetensors to calibrate")
    p.add_argument("--data", type=Path, required=True, help="data folder (dataset.json, or images/ + labels/)")
    p.add_argument("--split", default="validation", help="dataset.json list to choose on (default validation)")
    p.add_argument("--clicks", type=whole_number(1), default=5, help="clicks per lesion (default 5)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                   help="candidate logit thresholds (default -3 .. 1 in steps of 0.5)")
    p.add_argument("--prior-weights", type=parse_weight_pair, nargs="*", default=None, metavar="FIRST,LATER",
                   help="then choose the stable-region prior's weights (one positive click, further clicks) at the "
                        "chosen threshold among these pairs (without values: " +
                        " ".join(map(pair_label, DEFAULT_PRIOR_WEIGHTS)) + "); default: leave them as they are")
    p.add_argument("--prior-max-voxels", type=parse_voxels, default=MAX_VOXELS, metavar="N",
                   help=f"with --prior-weights: the largest stable region (voxels at 1.5 mm) the prior may take, "
                        f"stored with the weights (default {MAX_VOXELS})")
    p.add_argument("--boundary-bands", type=parse_band_pair, nargs="*", default=None, metavar="FIRST,LATER",
                   help="last, choose the boundary refinement's bands in voxels (one positive click, further "
                        "clicks; 0 = off) among these pairs (without values: " +
                        " ".join(map(pair_label, DEFAULT_BOUNDARY_BANDS)) + "); default: leave them as they are")
    p.add_argument("--coarse-view", choices=["on", "off"], default=None,
                   help="last, set the second look at twice the spacing on or off (both are measured on the split "
                        "and recorded); default: leave it as it is")
    p.add_argument("--out", type=Path, required=True, help="calibrated copy of the checkpoint to write")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from msam_core.checkpoints import load_model, save_checkpoint
    from msam_train.data import require_cases

    require_cases(args.data, args.split)  # a wrong folder or split fails before any evaluation
    model = load_model(args.checkpoint, device=args.device)
    meta = model.meta
    if "config" not in meta:
        raise InvalidCheckpoint(f"{args.checkpoint.name} is not an msam checkpoint (convert it with 'msam convert')")
    best, table = calibrate(model, args.data, args.split, args.clicks, tuple(args.thresholds), args.device)
    provenance = dict(meta.get("provenance") or {})
    provenance["calibration"] = {
        "split": args.split, "data": Path(args.data).name, "clicks": args.clicks,
        "objective": "mean Dice over clicks 1..N", "mask_threshold": best,
        "table": {f"{t:g}": v for t, v in table.items()},
    }
    if args.prior_weights is not None:
        weights = tuple(args.prior_weights) or DEFAULT_PRIOR_WEIGHTS
        (first, later), prior_table, choice = calibrate_prior(model, args.data, args.split, args.clicks, weights,
                                                              args.device, max_voxels=args.prior_max_voxels)
        provenance["calibration"].update({
            "prior_weight_first": first, "prior_weight": later, "prior_max_voxels": args.prior_max_voxels,
            "prior_choice": choice,
            "prior_table": {pair_label(w): v for w, v in prior_table.items()},
        })
        print(f"prior weights {pair_label((first, later))} (mean Dice {prior_table[(first, later)]['mean_dice']:.4f})")
    if args.boundary_bands is not None:
        bands = tuple(args.boundary_bands) or DEFAULT_BOUNDARY_BANDS
        (first, later), band_table, choice = calibrate_boundary(model, args.data, args.split, args.clicks, bands,
                                                                args.device)
        provenance["calibration"].update({
            "boundary_band_first": first, "boundary_band": later, "boundary_choice": choice,
            "boundary_table": {pair_label(b): v for b, v in band_table.items()},
        })
        print(f"boundary bands {pair_label((first, later))} (mean Dice {band_table[(first, later)]['mean_dice']:.4f})")
    if args.coarse_view is not None:
        record = measure_coarse_view(model, args.data, args.coarse_view == "on", args.split, args.clicks, args.device)
        provenance["calibration"]["coarse_view"] = record
    save_checkpoint(model.network, args.out, provenance, model.options)
    print(f"mask_threshold {best:+.2f} (mean Dice {table[best]['mean_dice']:.4f}; at 0: "
          f"{table[0.0]['mean_dice']:.4f})" if 0.0 in table else f"mask_threshold {best:+.2f}")
    print(f"wrote {args.out}")
    return 0
