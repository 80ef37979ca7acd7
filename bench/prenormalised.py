"""A pre-normalised copy of one split of an msam data set, to evaluate the bundled model on images
as researchers often keep them (already z-scored, or scaled to 0-1), with no HU left:

    python bench/prenormalised.py --data ~/.cache/msam/synth-seed0 --split validation \\
        --mode zscore --out /tmp/validation-zscore
    msam evaluate --data /tmp/validation-zscore --split validation --no-baseline

``zscore``: each image minus its mean, divided by its standard deviation (all voxels, float32);
``unit``: each image scaled so that its minimum is 0 and its maximum 1. Labels are copied
unchanged and the images keep their affines, so ``msam evaluate`` scores the same lesions with
the same clicks; only the intensities differ. The copy's ``dataset.json`` holds that split alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def normalise(array: np.ndarray, mode: str) -> np.ndarray:
    data = np.asarray(array, dtype=np.float64)
    if mode == "zscore":
        std = float(data.std())
        return ((data - data.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    return ((data - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="MSD data folder (dataset.json)")
    p.add_argument("--split", default="validation")
    p.add_argument("--mode", choices=("zscore", "unit"), default="zscore")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    manifest = json.loads((args.data / "dataset.json").read_text())
    entries = manifest.get(args.split)
    if not entries:
        print(f"{args.data}/dataset.json has no split {args.split!r}", file=sys.stderr)
        return 2
    for sub in ("imagesTr", "labelsTr"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    for entry in entries:
        img = nib.load(str(args.data / entry["image"]))
        out = nib.Nifti1Image(normalise(img.get_fdata(dtype=np.float32), args.mode), img.affine)
        out.set_qform(img.affine, code=1)
        out.set_sform(img.affine, code=1)
        nib.save(out, str(args.out / entry["image"]))
        shutil.copyfile(args.data / entry["label"], args.out / entry["label"])
    copy = {k: v for k, v in manifest.items() if not isinstance(v, list) or k == args.split}
    copy["description"] = f"{manifest.get('description', '')} - {args.split} split, images {args.mode}-normalised"
    (args.out / "dataset.json").write_text(json.dumps(copy, indent=1))
    print(f"wrote {len(entries)} {args.mode} images to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
