"""Training within one accelerator lease (``make gpu-model``), and bringing the result back.

A lent accelerator (docs/gpu-training.md) runs one command of at most 10 minutes, from the
repository plus carried files, and returns at most 8 files of at most 16 MiB each from ``$OUT``.
``python -m msam_train.lease run --pack FILE --out $OUT --minutes M`` trains with online
lesion synthesis (:mod:`msam_train.online`, bf16 autocast on CUDA) for ``M`` minutes and,
every minute:

- validates the network on the pack's validation crops (mean Dice over clicks 1..3, first click
  at the crop centre, each next one at the deepest voxel of the largest error, as ``msam
  evaluate`` clicks), prints steps/s and the GPU memory in use and at its peak;
- writes into ``OUT``: the latest checkpoint and the best one on validation, each split into
  parts under 16 MiB (``last.part0.safetensors``, ...; ``best...``), ``log.csv`` (training),
  and ``lease.json`` (settings, the pack's SHA-256, the validation history, speed, memory).

A run cut off at any point has therefore returned its best checkpoint of the last minute.
``python -m msam_train.lease join DIR --which best --out model.safetensors`` puts a
checkpoint's parts back together here (the weights and metadata unchanged). It imports torch,
numpy, scipy and safetensors only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: Largest part written into OUT (the lease returns files of at most 16 MiB).
PART_BYTES = 15 * 2**20
VALIDATION_CLICKS = 3


def split_checkpoint(path: Path, out: Path, stem: str, part_bytes: int = PART_BYTES) -> list[Path]:
    """Write the tensors of safetensors file ``path`` as ``out/stem.partN.safetensors`` files of
    at most about ``part_bytes`` each, every part with the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = list(f.keys())
        parts: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in names:
            tensor = f.get_tensor(name)
            nbytes = tensor.numel() * tensor.element_size()
            if parts[-1] and size + nbytes > part_bytes:
                parts.append({})
                size = 0
            parts[-1][name] = tensor
            size += nbytes
    for old in out.glob(f"{stem}.part*.safetensors"):
        old.unlink()
    written = []
    for i, part in enumerate(parts):
        target = out / f"{stem}.part{i}.safetensors"
        save_file(part, str(target.with_suffix(".tmp")), metadata=dict(meta, part=f"{i + 1}/{len(parts)}"))
        target.with_suffix(".tmp").replace(target)
        written.append(target)
    return written


def join_checkpoint(folder: Path, stem: str, out: Path) -> Path:
    """Put ``folder/stem.partN.safetensors`` back together as one safetensors file ``out``.

    Raises:
        ValueError: parts missing (a part names how many there are) or none found.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts = sorted(Path(folder).glob(f"{stem}.part*.safetensors"), key=lambda p: int(p.name.split(".part")[1].split(".")[0]))
    if not parts:
        raise ValueError(f"no {stem}.part*.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for p in parts:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state.update({k: f.get_tensor(k) for k in f.keys()})
    expected = int(meta.get("part", "0/0").split("/")[1])
    if expected != len(parts):
        raise ValueError(f"{folder} holds {len(parts)} parts of {stem}, its metadata says {expected}")
    meta.pop("part", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    return out


@torch.no_grad()
def validate(model, images: torch.Tensor, masks: torch.Tensor, clicks: int = VALIDATION_CLICKS,
             batch: int = 4) -> float:
    """Mean Dice over clicks 1..``clicks`` on crops ``[N, 1, S, S, S]`` whose first click is the
    centre: each next click at the deepest voxel of the largest error (:func:`next_click`),
    the previous logits fed back, as ``msam evaluate`` does on the network's crop."""
    from msam_core.model.decode_cache import DecodeCache
    from msam_train.clicks import next_click
    from msam_train.trainer import upsample

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    size = images.shape[-1]
    for start in range(0, len(images), batch):
        image = images[start:start + batch].to(device)
        gt = masks[start:start + batch].to(device) > 0.5
        n = len(image)
        with model.autocast():
            embedding = model.encode(image)
        points = torch.full((n, 1, 3), float(size // 2), device=device)
        labels = torch.ones(n, 1, dtype=torch.long, device=device)
        low = None
        decoded = DecodeCache()
        per_click = []
        for k in range(clicks):
            with model.autocast():
                low = model.decode(embedding, points, labels, low, decoded)
            pred = upsample(low, size) > 0
            inter = (pred & gt).sum(dim=(1, 2, 3, 4)).float()
            denom = (pred.sum(dim=(1, 2, 3, 4)) + gt.sum(dim=(1, 2, 3, 4))).float()
            per_click.append(torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom)))
            if k + 1 < clicks:
                new_points, new_labels = [], []
                p_np, g_np = pred[:, 0].cpu().numpy(), gt[:, 0].cpu().numpy()
                for i in range(n):
                    nxt = next_click(p_np[i], g_np[i])
                    point, label = (nxt if nxt is not None else (np.full(3, size // 2), 1))
                    new_points.append(torch.as_tensor(point, dtype=torch.float32))
                    new_labels.append(label)
                points = torch.cat([points, torch.stack(new_points)[:, None].to(device)], 1)
                labels = torch.cat([labels, torch.tensor(new_labels, device=device)[:, None]], 1)
        scores.append(torch.stack(per_click, 1).mean(1).cpu())
    model.train(was_training)
    return float(torch.cat(scores).mean()) if scores else float("nan")


class Exporter:
    """The ``on_save`` hook of :func:`~msam_train.trainer.train`: validate, print speed and
    memory, and write the latest and best checkpoints (in parts), the log and ``lease.json``."""

    def __init__(self, out: Path, run: Path, images: torch.Tensor, masks: torch.Tensor, info: dict, log=print) -> None:
        self.out, self.run, self.images, self.masks, self.info, self.log = out, run, images, masks, info, log
        self.best = -1.0
        self.history: list[dict] = []
        self.t0 = time.time()
        self.last = (self.t0, 0)

    def __call__(self, path: Path, step: int, model) -> None:
        now = time.time()
        rate = (step - self.last[1]) / max(now - self.last[0], 1e-9)  # training alone: exports are not counted
        dice = validate(model, self.images, self.masks) if len(self.images) else float("nan")
        memory = {}
        if torch.cuda.is_available():
            memory = {"gpu_memory_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                      "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        row = {"step": step, "minutes": round((now - self.t0) / 60, 2), "steps_per_s": round(rate, 3),
               "val_dice_clicks_1_3": round(dice, 4), **memory}
        self.history.append(row)
        self.log(f"\n[lease] {json.dumps(row)}")
        split_checkpoint(path, self.out, "last")
        if not np.isfinite(dice) or dice > self.best:  # without validation crops: the latest
            self.best = dice
            split_checkpoint(path, self.out, "best")
        if (self.run / "log.csv").is_file():
            shutil.copyfile(self.run / "log.csv", self.out / "log.csv")
        summary = {**self.info, "best_val_dice_clicks_1_3": round(self.best, 4), "history": self.history}
        (self.out / "lease.json").write_text(json.dumps(summary, indent=1, default=str))
        self.last = (time.time(), step)


def run(args: argparse.Namespace) -> int:
    from msam_train.pack import load_pack
    from msam_train.trainer import TrainSettings, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="msam-lease-"))
    pack = load_pack(Path(args.pack))
    images, masks, crops = pack.validation("validation", limit=args.val_crops)
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = TrainSettings(
        config="msam_small_regions", pack=str(args.pack), out=str(run_dir), init=str(args.init) if args.init else None,
        train_all=args.init is not None, steps=args.steps, batch_size=args.batch_size, iterations=args.iterations,
        warmup=args.warmup, device=args.device, max_minutes=args.minutes, save_every=args.save_every, seed=args.seed,
        threads=args.threads, thick_slices=args.thick_slices, lr=args.lr)
    info = {"command": " ".join(sys.argv), "pack": Path(args.pack).name, "pack_sha256": pack.sha256,
            "validation_crops": len(crops), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu",
            "settings": {k: v for k, v in vars(args).items() if k != "func"}}
    exporter = Exporter(out, run_dir, images, masks, {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()})
    train(settings, on_save=exporter, pack=pack)
    print(f"[lease] done: best validation Dice (clicks 1..{VALIDATION_CLICKS}) {exporter.best:.4f}; files in {out}: "
          + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msam_train.lease", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train with online synthesis, exporting every --save-every minutes")
    r.add_argument("--pack", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True, help="folder returned by the lease ($OUT)")
    r.add_argument("--run", type=Path, default=None, help="training folder (default: a new temporary one; keep it "
                   "off OUT: last.pt holds the optimiser and exceeds what a lease returns)")
    r.add_argument("--minutes", type=float, required=True, help="training time (the schedule ends with it)")
    r.add_argument("--steps", type=int, default=100000, help="step cap (the minutes normally end the run first)")
    r.add_argument("--init", type=Path, default=None, help="continue these weights (every parameter trains)")
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--iterations", type=int, default=5)
    r.add_argument("--warmup", type=int, default=30)
    r.add_argument("--lr", type=float, default=None)
    r.add_argument("--thick-slices", type=float, default=0.0)
    r.add_argument("--save-every", type=float, default=1.0, help="minutes between exports")
    r.add_argument("--val-crops", type=int, default=24, help="validation crops checked at every export")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=run)
    j = sub.add_parser("join", help="put a returned checkpoint's parts back together")
    j.add_argument("folder", type=Path)
    j.add_argument("--which", default="best", choices=["best", "last"])
    j.add_argument("--out", type=Path, required=True)
    j.set_defaults(func=lambda a: print(join_checkpoint(a.folder, a.which, a.out)) or 0)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
