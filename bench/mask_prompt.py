"""Dice of the bundled model when a lesion is prompted by a mask (the previous-mask prompt that
``msam segment --mask`` and the service's ``"mask"`` pass), on a data set's split:

    python bench/mask_prompt.py --data ~/.cache/msam/synth-seed0 --split validation [--checkpoint PATH]

Per lesion, the expert mask is eroded by 1 voxel and dilated by 2 voxels (a 3-D cross, on the
case's 1.5 mm grid): a mask too small and one too large, as another model or an earlier study
might give. Each is used as the prompt alone and together with one positive click at the expert
mask's deepest voxel (the first click of ``msam evaluate``); the click alone is the reference.
Prints the mean Dice against the expert mask, on the case's grid, of the prompt itself and of
the model's answer, over the lesions where the eroded mask is not empty (the same lesions for
every row). Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def main(argv: list[str] | None = None) -> int:
    from msam_core.checkpoints import load_model
    from msam_core.cli.segment import resolve_checkpoint
    from msam_core.io.load import load_volume
    from msam_core.pipeline.prompts import Point, deepest_point_voxel, resolve_prompts
    from msam_core.pipeline.segmenter import Segmenter
    from msam_train.data import require_cases

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--checkpoint", type=Path, default=None)
    args = p.parse_args(argv)
    loaded = load_model(resolve_checkpoint(args.checkpoint))
    segmenter = Segmenter(loaded.network, loaded.options)
    cross = ndimage.generate_binary_structure(3, 1)
    rows: dict[str, list[float]] = {}
    skipped = 0
    for case in require_cases(args.data, args.split):
        volume = load_volume(case.image)
        labels = np.rint(np.asarray(load_volume(case.label).array)).astype(np.int32)
        sampler = segmenter.sampler(volume)
        for k in (int(v) for v in np.unique(labels) if v):
            gt = labels == k
            prompts = {"eroded 1": ndimage.binary_erosion(gt, cross, iterations=1),
                       "dilated 2": ndimage.binary_dilation(gt, cross, iterations=2)}
            if not prompts["eroded 1"].any():
                skipped += 1
                continue
            click = [Point(tuple(float(v) for v in deepest_point_voxel(gt)), label=1)]

            def run(points, mask) -> float:
                lesions = resolve_prompts(volume, points, lesion_priors={1: mask} if mask is not None else None)
                return dice(segmenter.segment_lesions(volume, lesions, sampler=sampler).labels == 1, gt)

            rows.setdefault("click alone", []).append(run(click, None))
            for name, mask in prompts.items():
                rows.setdefault(f"{name}: the prompt itself", []).append(dice(mask, gt))
                rows.setdefault(f"{name}: mask alone", []).append(run([], mask))
                rows.setdefault(f"{name}: mask + click", []).append(run(click, mask))
        print(f"{case.name}: done", file=sys.stderr)
    n = len(rows.get("click alone", []))
    print(f"{args.split}: {n} lesions ({skipped} left out: eroding them by one voxel leaves nothing)")
    for name, values in rows.items():
        print(f"  {name:<32} mean Dice {np.mean(values):.3f}  median {np.median(values):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
