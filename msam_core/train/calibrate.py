"""``msam calibrate``: choose a trained model's decision threshold on validation lesions.

A model trained with soft Dice + cross-entropy need not be best at ``sigmoid > 0.5``: the
bundled ``msam_small``, unsure of a lesion's extent after one click, draws a blob that is too
small for most lesions, and a lower logit threshold fits them better. This command runs
:mod:`msam_core.train.evaluate`'s click protocol (first click at the deepest voxel, each next
one in the largest error, previous logits fed back) on a split - **validation**, never the
data the model is judged on - once per candidate threshold, and keeps the threshold with the
highest mean Dice over clicks 1..N (the area under the Dice-versus-clicks curve, so one-click
and multi-click results both count); ties go to the threshold nearest 0.

The threshold is written into a copy of the checkpoint (``ModelConfig.mask_threshold``, with
the table of scores in the provenance); the weights are unchanged. Every user of the model
(``msam segment``, the worker, ``msam evaluate``) then decides at it, because
:meth:`~msam_core.model.msam.MSAM.decode` returns logits minus the threshold.

``--prior-weights``: then, at the chosen threshold, the same protocol once per candidate pair of
weights of the stable-region prior (:mod:`msam_core.pipeline.region_prior`: one for a lesion
prompted by one positive click, one after further clicks), keeping the pair with the highest mean
Dice (ties: the smaller total weight); written as ``ModelConfig.prior_weight_first`` and
``prior_weight``, used by :meth:`~msam_core.pipeline.segmenter.Segmenter.crop_logits`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

#: Candidate thresholds (logits): sigmoid 0.05 .. 0.73.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(-3.0, 1.01, 0.5), 2))
#: Candidate ``(first, later)`` weights of the stable-region prior (``--prior-weights``).
DEFAULT_PRIOR_WEIGHTS: tuple[tuple[float, float], ...] = ((0, 0), (2, 2), (4, 2), (8, 2), (8, 0), (4, 4))


def set_threshold(model, threshold: float) -> None:
    """Set ``model``'s decision threshold (``ModelConfig.mask_threshold``) in place."""
    model.config = replace(model.config, mask_threshold=float(threshold))


def set_prior_weights(model, first: float, later: float) -> None:
    """Set ``model``'s stable-region prior weights (``ModelConfig.prior_weight_first``,
    ``prior_weight``) in place."""
    model.config = replace(model.config, prior_weight_first=float(first), prior_weight=float(later))


def _scan(model, candidates: list, apply, data_dir: Path, split: str, clicks: int, device: str, embeddings,
          log, label) -> dict:
    """Run the click protocol once per candidate (``apply(model, candidate)`` first) -> ``{candidate:
    {"mean_dice": m, "dice": [Dice@1..N]}}``."""
    from msam_core.train.evaluate import evaluate

    table: dict = {}
    for key in candidates:
        apply(model, key)
        summary = evaluate(Path(data_dir), None, split, clicks, None, device=device, baseline=False, model=model,
                           log=lambda *_: None, embedding_cache=embeddings)
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


def calibrate_prior(model, data_dir: Path, split: str = "validation", clicks: int = 5,
                    weights: tuple[tuple[float, float], ...] = DEFAULT_PRIOR_WEIGHTS, device: str = "cpu",
                    log=print) -> tuple[tuple[float, float], dict]:
    """Like :func:`calibrate`, for the stable-region prior's ``(first, later)`` weights at the
    model's threshold; ties go to the smaller total weight (nearest to off). ``model`` is left at
    the best pair. A negative or non-finite weight raises ``ValueError`` (``ModelConfig``)."""
    from msam_core.pipeline.segmenter import DictEmbeddingCache

    if not weights:
        raise ValueError("give at least one pair of prior weights")
    table = _scan(model, [(float(a), float(b)) for a, b in weights], lambda m, w: set_prior_weights(m, *w), data_dir,
                  split, clicks, device, DictEmbeddingCache(max_items=100_000), log,
                  lambda w: f"prior weights {w[0]:g},{w[1]:g}")
    best = max(table, key=lambda w: (table[w]["mean_dice"], -sum(w)))
    set_prior_weights(model, *best)
    return best, table


def parse_weight_pair(text: str) -> tuple[float, float]:
    """``"FIRST,LATER"`` -> ``(first, later)`` (argparse type)."""
    try:
        first, later = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST,LATER (two numbers, e.g. 8,2), got {text!r}") from None
    if not (np.isfinite([first, later]).all() and min(first, later) >= 0):
        raise argparse.ArgumentTypeError(f"prior weights must be finite and >= 0, got {text!r}")
    return first, later


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="choose a model's decision threshold on validation lesions",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="msam .safetensors to calibrate")
    p.add_argument("--data", type=Path, required=True, help="data folder (dataset.json, or images/ + labels/)")
    p.add_argument("--split", default="validation", help="dataset.json list to choose on (default validation)")
    p.add_argument("--clicks", type=int, default=5, help="clicks per lesion (default 5)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                   help="candidate logit thresholds (default -3 .. 1 in steps of 0.5)")
    p.add_argument("--prior-weights", type=parse_weight_pair, nargs="*", default=None, metavar="FIRST,LATER",
                   help="then choose the stable-region prior's weights (one positive click, further clicks) at the "
                        "chosen threshold among these pairs (without values: " +
                        " ".join(f"{a:g},{b:g}" for a, b in DEFAULT_PRIOR_WEIGHTS) + "); default: leave them as they are")
    p.add_argument("--out", type=Path, required=True, help="calibrated copy of the checkpoint to write")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from msam_core.checkpoints import load_checkpoint, save_checkpoint

    if args.clicks < 1:
        raise SystemExit("msam calibrate: --clicks must be at least 1")
    model = load_checkpoint(args.checkpoint, device=args.device)
    meta = getattr(model, "checkpoint_meta", {}) or {}
    if "config" not in meta:
        raise SystemExit(f"msam calibrate: {args.checkpoint.name} is not an msam checkpoint (convert it with 'msam convert')")
    best, table = calibrate(model, args.data, args.split, args.clicks, tuple(args.thresholds), args.device)
    provenance = dict(meta.get("provenance") or {})
    provenance["calibration"] = {
        "split": args.split, "data": Path(args.data).name, "clicks": args.clicks,
        "objective": "mean Dice over clicks 1..N", "mask_threshold": best,
        "table": {f"{t:g}": v for t, v in table.items()},
    }
    if args.prior_weights is not None:
        weights = tuple(args.prior_weights) or DEFAULT_PRIOR_WEIGHTS
        (first, later), prior_table = calibrate_prior(model, args.data, args.split, args.clicks, weights, args.device)
        provenance["calibration"].update({
            "prior_weight_first": first, "prior_weight": later,
            "prior_table": {f"{a:g},{b:g}": v for (a, b), v in prior_table.items()},
        })
        print(f"prior weights {first:g},{later:g} (mean Dice {prior_table[(first, later)]['mean_dice']:.4f})")
    save_checkpoint(model, args.out, provenance)
    print(f"mask_threshold {best:+.2f} (mean Dice {table[best]['mean_dice']:.4f}; at 0: "
          f"{table[0.0]['mean_dice']:.4f})" if 0.0 in table else f"mask_threshold {best:+.2f}")
    print(f"wrote {args.out}")
    return 0
