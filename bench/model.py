"""Model speed and memory: our encoder against upstream's padded-window computation.

    .venv/bin/python bench/model.py [--config sam_med3d] [--device cpu|cuda] [--repeats 3] [--threads N]

Prints, for the encoder (one 128^3 crop) and the decoder (one click with the previous mask, with
the MEA when the config has one): median latency over ``--repeats`` runs after one warm-up, and
peak memory (RSS on CPU, CUDA max allocated on GPU). Each variant runs in its own process so
its peak is its own. "reference" is the upstream-equivalent computation from
``tests.fixtures.reference`` (zero-padded 14^3 window, 2,744 tokens); "ours" is the closed form.
Weights are random: speed does not depend on their values. Output agreement is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(variant: str, config: str, device: str, repeats: int, threads: int | None) -> dict:
    import torch

    from msam_core.model import build_model
    from tests.fixtures.reference import reference_encode

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, 128, 128, 128, generator=gen).to(device)
    points = torch.tensor([[[64.0, 64.0, 64.0]]], device=device)
    labels = torch.tensor([[1]], device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        """Median wall-clock seconds, and median CPU seconds of this process (all threads):
        the CPU figure stays meaningful when other work shares the machine."""
        fn()
        sync()
        walls, cpus = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            sync()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        return out, statistics.median(walls), statistics.median(cpus)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result: dict = {"variant": variant, "config": config, "device": device, "threads": torch.get_num_threads()}
    with torch.inference_mode(), model.autocast() if variant.endswith("amp") else torch.inference_mode():
        if variant.startswith("reference"):
            # model.encode with upstream's padded-window image encoder in place of ours (the
            # input transform and any high-res stem channels stay model.encode's own)
            encoder = model.image_encoder
            encoder.forward = lambda x: reference_encode(encoder, x)
        emb, t, c = timed(lambda: model.encode(image))
        result["encoder_s"], result["encoder_cpu_s"] = t, c
        prev = torch.zeros(1, 1, 32, 32, 32, device=device)
        _, t, c = timed(lambda: model.decode(emb, points, labels, prev))
        result["decoder_s"], result["decoder_cpu_s"] = t, c
        torch.save(emb.float().cpu(), f"/tmp/msam_bench_{variant}.pt")
    if device == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="sam_med3d")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.config, args.device, args.repeats, args.threads)))
        return
    variants = ["reference", "ours"] + (["ours-amp"] if args.device == "cuda" else [])
    rows = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--config", args.config, "--device", args.device, "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    import torch

    ref = torch.load("/tmp/msam_bench_reference.pt")
    print(f"config {args.config}, device {args.device}, {rows[0]['threads']} threads, median of {args.repeats} after 1 warm-up")
    print(f"load average before: {os.getloadavg()[0]:.2f} (timings are only comparable on an idle machine)")
    print(f"{'variant':<10} {'encoder s':>10} {'(cpu s)':>8} {'decode/click ms':>16} {'(cpu ms)':>9} {'peak MB':>8} {'max rel diff':>13}")
    for r in rows:
        emb = torch.load(f"/tmp/msam_bench_{r['variant']}.pt")
        diff = float((emb - ref).abs().max() / ref.abs().max())
        print(
            f"{r['variant']:<10} {r['encoder_s']:>10.3f} {r['encoder_cpu_s']:>8.2f} {r['decoder_s'] * 1e3:>16.1f} "
            f"{r['decoder_cpu_s'] * 1e3:>9.0f} {r['peak_mem_mb']:>8.0f} {diff:>13.1e}"
        )
    print(
        f"encoder speed-up, ours vs reference: {rows[0]['encoder_s'] / rows[1]['encoder_s']:.1f}x wall, "
        f"{rows[0]['encoder_cpu_s'] / rows[1]['encoder_cpu_s']:.1f}x CPU time"
    )


if __name__ == "__main__":
    main()
