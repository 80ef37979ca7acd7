"""Which prompts a RECIST line should become: ``msam evaluate``'s line protocol
(:func:`msam_train.evaluate.line_protocol`, the expert mask's long axis as the line) for
every strategy of :data:`msam_core.pipeline.lines.STRATEGIES`, beside the click protocol's first
click, on one split. The strategies share the line's crop, so each crop is encoded once
(an in-memory embedding cache).

    .venv/bin/python -m bench.line_strategies --data DATA --split validation [--checkpoint CKPT]

Prints mean Dice per strategy and the paired difference to the service's default.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from msam_core.checkpoints import load_model
    from msam_core.cli.segment import DEFAULT_CHECKPOINT
    from msam_core.io.load import load_volume
    from msam_core.pipeline.lines import DEFAULT_STRATEGY, STRATEGIES
    from msam_core.pipeline.segmenter import DictEmbeddingCache, Segmenter
    from msam_train.data import require_cases
    from msam_train.evaluate import _model_clicks, coarse_crop, lesion_crop, line_protocol

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all)")
    args = p.parse_args()
    chosen = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    model = load_model(args.checkpoint)
    segmenter = Segmenter(model.network, model.options, cache=DictEmbeddingCache(max_items=4))
    scores: dict[str, list[float]] = {"first click": [], **{s: [] for s in chosen}}
    t0 = time.time()
    for case in require_cases(args.data, args.split):
        volume = load_volume(case.image)
        labels = np.asarray(load_volume(case.label).array)
        sampler = segmenter.sampler(volume)
        for k in (int(v) for v in np.unique(labels) if v > 0):
            gt = labels == k
            crop = lesion_crop(sampler, volume, gt, segmenter.model.img_size)
            image, gt_crop, centre, grid = crop
            first = _model_clicks(segmenter, image, gt_crop, centre, grid, 1, 2.0, True,
                                  coarse_image=coarse_crop(segmenter, sampler, grid))
            scores["first click"].append(first[0][0])
            for strategy in chosen:
                scores[strategy].append(line_protocol(segmenter, sampler, volume, gt, strategy, 2.0)[0])
        print(f"{case.name}: done ({time.time() - t0:.0f} s)", flush=True)
    base = np.asarray(scores[DEFAULT_STRATEGY] if DEFAULT_STRATEGY in chosen else scores["first click"])
    rng = np.random.default_rng(0)
    print(f"\n{args.split}: {len(base)} lesions, checkpoint {args.checkpoint.name}")
    for name, values in scores.items():
        v = np.asarray(values)
        diff = v - base
        boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        print(f"{name:16s} mean Dice {v.mean():.3f}   minus {DEFAULT_STRATEGY if DEFAULT_STRATEGY in chosen else 'first click'}: "
              f"{diff.mean():+.3f} "
              f"(95% bootstrap interval {lo:+.3f} to {hi:+.3f})")


if __name__ == "__main__":
    main()
