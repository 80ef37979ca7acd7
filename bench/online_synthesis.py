"""The data side of a training step: online lesion synthesis against the crop cache.

    .venv/bin/python bench/online_synthesis.py --pack .pack/msam-pack.npz [--data DIR] \
        [--device cpu|cuda] [--batch-size 2] [--batches 10] [--threads N]

Prints the median seconds to produce one training batch ``[B, 1, 128, 128, 128]`` (image, mask,
first click) on the device: ``online`` draws fresh lesions from the pack
(:class:`msam_train.online.OnlineCrops`), ``cache`` reads the crop cache of ``DIR``'s training
split as ``msam train --data`` does (:class:`msam_train.data.CropDataset`, built first if
missing; held on the device when it is CUDA). The model's step is the same for both, so this is
the whole difference in speed between the two ways of training. Runs on a machine without
SimpleITK for ``online`` alone (no ``--data``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import numpy as np
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None, help="a msam data synth folder (for the cache side)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(make_batch) -> list[float]:
        make_batch(0)  # warm-up
        times = []
        for i in range(1, args.batches + 1):
            sync()
            t0 = time.perf_counter()
            make_batch(i)
            sync()
            times.append(time.perf_counter() - t0)
        return times

    from msam_train.online import OnlineCrops
    from msam_train.pack import load_pack

    t0 = time.perf_counter()
    pack = load_pack(args.pack)
    load_s = time.perf_counter() - t0
    crops = OnlineCrops(pack, device)
    result = {"device": args.device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "pack_load_s": round(load_s, 2)}
    online = timed(lambda i: crops.batch(np.random.default_rng([0, i, 1]), args.batch_size))
    result["online_s_per_batch"] = round(statistics.median(online), 3)
    if args.data is not None:
        from msam_train.data import CropDataset, build_cache

        cache = CropDataset(build_cache(args.data, "training", 4, seed=0, log_fn=lambda *_: None), augment=True,
                            device=device if device.type == "cuda" else None)

        def cached(i: int):
            order = np.random.default_rng([0, i]).permutation(len(cache))[: args.batch_size]
            items = [cache[int(j)] for j in order]
            return [torch.stack([x[k] for x in items]).to(device) for k in range(3)]

        result["cache_s_per_batch"] = round(statistics.median(timed(cached)), 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
