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
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

#: Candidate thresholds (logits): sigmoid 0.05 .. 0.73.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(-3.0, 1.01, 0.5), 2))


def set_threshold(model, threshold: float) -> None:
    """Set ``model``'s decision threshold (``ModelConfig.mask_threshold``) in place."""
    model.config = replace(model.config, mask_threshold=float(threshold))


def calibrate(model, data_dir: Path, split: str = "validation", clicks: int = 5,
              thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS, device: str = "cpu", log=print) -> tuple[float, dict]:
    """``-> (best threshold, {threshold: {"mean_dice": m, "dice": [Dice@1..N]}})``; ``model`` is
    left at the best threshold."""
    from msam_core.pipeline.segmenter import DictEmbeddingCache
    from msam_core.train.evaluate import evaluate

    if not thresholds:
        raise ValueError("give at least one threshold")
    table: dict[float, dict] = {}
    embeddings = DictEmbeddingCache(max_items=100_000)  # the threshold changes no embedding: encode once
    for t in thresholds:
        set_threshold(model, t)
        summary = evaluate(Path(data_dir), None, split, clicks, None, device=device, baseline=False, model=model,
                           log=lambda *_: None, embedding_cache=embeddings)
        dice = [round(float(v), 4) for v in summary["groups"]["all"]["msam"]["dice"]]
        table[float(t)] = {"mean_dice": round(float(np.mean(dice)), 4), "dice": dice}
        log(f"threshold {t:+.2f}: mean Dice {table[float(t)]['mean_dice']:.4f} (" +
            " ".join(f"@{i + 1} {d:.3f}" for i, d in enumerate(dice)) + f") on {summary['lesions']} {split} lesions")
    best = max(table, key=lambda t: (table[t]["mean_dice"], -abs(t)))
    set_threshold(model, best)
    return best, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="choose a model's decision threshold on validation lesions",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="msam .safetensors to calibrate")
    p.add_argument("--data", type=Path, required=True, help="data folder (dataset.json, or images/ + labels/)")
    p.add_argument("--split", default="validation", help="dataset.json list to choose on (default validation)")
    p.add_argument("--clicks", type=int, default=5, help="clicks per lesion (default 5)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                   help="candidate logit thresholds (default -3 .. 1 in steps of 0.5)")
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
    save_checkpoint(model, args.out, provenance)
    print(f"mask_threshold {best:+.2f} (mean Dice {table[best]['mean_dice']:.4f}; at 0: "
          f"{table[0.0]['mean_dice']:.4f})" if 0.0 in table else f"mask_threshold {best:+.2f}")
    print(f"wrote {args.out}")
    return 0
