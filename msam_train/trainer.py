"""``msam train``: M-SAM's training recipe on cached crops.

Recipe (M-SAM, ``train_msam.py``, on SAM-Med3D's interactive training):

- **Trainable parts**, starting from SAM-Med3D or M-SAM weights (``--init``): the image encoder frozen
  except its LoRA (rank 4 on q and v); prompt encoder, mask decoder and Mask-Enhanced Adapter
  trained (:meth:`MSAM.set_trainable`). AdamW, weight decay 0.1, LR 8e-4 for LoRA + MEA and
  8e-5 for prompt encoder + decoder.
- **From scratch** (no ``--init``; e.g. ``msam_small_regions``, which has no pretrained encoder): there
  is nothing to adapt, so *every* parameter trains, encoder included, in one group at ``--lr``
  (default 4e-4). Freezing a random encoder would leave it random.
- **Click simulation** per batch: one image embedding, then ``--iterations`` decoder passes
  (11 by default). Pass 1 uses the first click (in the lesion: the crop centre, exactly as
  inference centres the crop on the first click); every later pass adds one click drawn from
  the error region of the previous prediction (see :mod:`msam_train.clicks`) and feeds the
  previous low-resolution logits back as the mask prompt. As in M-SAM, one random pass (from the
  third on) and the last pass add no click - they refine with the clicks so far.
- **Mask-prompt dropout** (our addition): ``msam segment`` decodes without a mask prompt
  (``no_mask_embed``) unless given a prior, which M-SAM's loop never trains; so pass 1 gets no
  mask prompt in half of the batches (else zeros, as M-SAM) and later passes in 20 %.
- **Loss**: MONAI's ``DiceCELoss`` (sigmoid, squared prediction; written out in torch in
  :mod:`msam_train.loss`, so training needs no MONAI) between the logits upsampled to
  128^3 (trilinear, as inference) and the mask, summed over all passes; one backward per batch.
  The fed-back logits are detached (gradients do not flow from pass to pass).
- Warm-up (linear) then cosine decay; flips and intensity augmentation (in the data set); bf16 autocast on CUDA; CSV log (and TensorBoard when the ``tensorboard`` package is present);
  ``last.pt`` for ``--resume`` and ``model.safetensors`` (msam format, provenance metadata)
  written every ``--save-every`` minutes, so an interrupted run is still usable; with
  ``--keep-checkpoints`` every save is also kept as ``checkpoints/step-NNNNNN.safetensors``.
- **Data**: the crop cache of a data set (``--data``, :mod:`msam_train.data`), or with
  ``--pack`` crops with lesions synthesised afresh on the training device at every step
  (:mod:`msam_train.online`); that path imports only torch, numpy and scipy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from msam_core.cli.arguments import number, whole_number
from msam_core.errors import InvalidDataset, UnsupportedRequest
from msam_core.model import MSAM, build_model, is_added_parameter
from msam_core.model.decode_cache import DecodeCache
from msam_core.model.configs import get_config

SAM_LR_ADAPTER = 8e-4
SAM_LR_DECODER = 8e-5
SCRATCH_LR = 4e-4
#: The configurations ``msam train`` builds (``sam_med3d`` is upstream's network, loaded, never trained here).
TRAINABLE_CONFIGS = ("msam_small", "msam_small_regions", "msam")


@dataclass
class TrainSettings:
    config: str = "msam_small"
    data: str = ""
    out: str = "runs/msam"
    init: str | None = None
    steps: int = 1000
    batch_size: int = 2
    iterations: int = 11
    lr: float | None = None
    lr_decoder: float | None = None
    weight_decay: float = 0.1
    warmup: int = 50
    crops_per_lesion: int = 2
    device: str = "auto"
    amp: bool = True
    max_minutes: float | None = None
    save_every: float = 5.0
    seed: int = 0
    resume: bool = False
    threads: int | None = None
    workers: int = 1
    keep_checkpoints: bool = False
    #: With ``init``: every parameter trains at ``lr`` (continuing a from-scratch network such as
    #: the bundled one, as the GPU lease does) instead of M-SAM's LoRA/MEA/decoder recipe.
    train_all: bool = False
    #: Chance of the thick-slice augmentation per crop (:func:`msam_train.data.thicken`);
    #: the GPU lease's ``--thick-slices``.
    thick_slices: float = 0.0
    #: A pack (``msam data pack``): online lesion synthesis instead of the crop cache of ``data``.
    pack: str | None = None
    extra: dict = field(default_factory=dict)


def param_groups(model: MSAM, s: TrainSettings, from_pretrained: bool) -> list[dict]:
    """The optimiser's parameter groups (and ``requires_grad`` set accordingly)."""
    if from_pretrained and not s.train_all:
        model.set_trainable()
        adapter = [p for n, p in model.named_parameters() if p.requires_grad and is_added_parameter(n)]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and not is_added_parameter(n)]
        return [{"params": adapter, "lr": s.lr or SAM_LR_ADAPTER, "name": "lora+mea"},
                {"params": rest, "lr": s.lr_decoder or SAM_LR_DECODER, "name": "prompt_encoder+decoder"}]
    for p in model.parameters():
        p.requires_grad = True
    return [{"params": list(model.parameters()), "lr": s.lr or SCRATCH_LR,
             "name": "all (continued)" if from_pretrained else "all (from scratch)"}]


def lr_factor(step: int, total: int, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 %; progress is the larger of the step fraction and
    the fraction of ``--max-minutes`` spent (so a time-limited run still ends its schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(low.float(), size=(size, size, size), mode="trilinear", align_corners=False)


def hard_dice(logits: torch.Tensor, gt: torch.Tensor) -> float:
    pred = logits > 0
    gtb = gt > 0.5
    inter = (pred & gtb).sum(dim=(1, 2, 3, 4)).float()
    denom = (pred.sum(dim=(1, 2, 3, 4)) + gtb.sum(dim=(1, 2, 3, 4))).float()
    return float(torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom)).mean())


def interaction_step(model: MSAM, image: torch.Tensor, gt: torch.Tensor, first: torch.Tensor, iterations: int,
                     loss_fn, rng: np.random.Generator, generator: torch.Generator | None = None,
                     first_pass_no_mask: float = 0.5, mask_dropout: float = 0.2) -> tuple[torch.Tensor, dict]:
    """One batch of M-SAM's simulated interaction; returns the summed loss and statistics.

    ``first_pass_no_mask``: probability that pass 1 gets no mask prompt (``None``, as
    :meth:`Segmenter.predict` without a prior) instead of all-zero logits (M-SAM);
    ``mask_dropout``: probability that a later pass gets no mask prompt instead of the previous
    logits (as a stateless ``msam segment`` call with several clicks).
    """
    from msam_train.clicks import random_error_clicks

    size = image.shape[-1]
    embedding = model.encode(image)
    points = first[:, None, :].to(image.device)
    labels = torch.ones(image.shape[0], 1, dtype=torch.long, device=image.device)
    r = model.config.low_res
    low = torch.zeros(image.shape[0], 1, r, r, r, device=image.device, dtype=embedding.dtype)
    no_click = int(rng.integers(2, iterations - 1)) if iterations > 3 else -1
    total = image.new_zeros(())
    stats: dict = {}
    gt_bool = gt > 0.5
    decode_cache = DecodeCache()  # each simulated click's region is grown once, not on every pass
    for it in range(iterations):
        if 0 < it < iterations - 1 and it != no_click:
            with torch.no_grad():
                pred = upsample(low, size) > 0
            new_pts, new_lab = random_error_clicks(pred, gt_bool, generator)
            points = torch.cat([points, new_pts.to(points.device)], 1)
            labels = torch.cat([labels, new_lab.to(labels.device)], 1)
        # The service decodes from the clicks alone (no_mask_embed) and msam evaluate feeds the
        # previous logits back; train both (mask-prompt dropout).
        drop = rng.random() < (first_pass_no_mask if it == 0 else mask_dropout)
        low = model.decode(embedding, points, labels, None if drop else low.detach(), decode_cache)
        up = upsample(low, size)
        loss = loss_fn(up, gt)
        total = total + loss
        if it == 0:
            stats["loss_first"] = float(loss.detach())
            stats["dice_first"] = hard_dice(up.detach(), gt)
    stats["loss_last"] = float(loss.detach())
    stats["dice_last"] = hard_dice(up.detach(), gt)
    stats["clicks"] = int(points.shape[1])
    return total, stats


def _drop_rows_after(csv_path: Path, step: int) -> None:
    """Keep only the log rows of steps up to ``step`` (the checkpoint a run resumes from)."""
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows[0].keys() if rows else None
    if fields is None or all(int(r["step"]) <= step for r in rows):
        return
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= step)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        return ""


class Progress:
    """A dependency-free progress line (a bar on a terminal, one line per ``every`` steps in logs)."""

    def __init__(self, total: int, every: int = 10) -> None:
        self.total, self.every, self.tty = total, every, sys.stderr.isatty()

    def update(self, step: int, text: str, fraction: float | None = None) -> None:
        frac = min(1.0, step / max(1, self.total) if fraction is None else fraction)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"[{bar}] {step}/{self.total} {text}"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)


def train(s: TrainSettings, log=print, on_save=None, pack=None) -> Path:
    """Run training; returns the path of the final ``model.safetensors``. ``on_save(path, step,
    model)``, when given, runs after every save (``msam_train.lease`` validates and exports);
    ``pack``: the :class:`~msam_train.pack.Pack` of ``s.pack`` when the caller has read it."""
    from msam_core.checkpoints import init_from_checkpoint, save_checkpoint
    from msam_train.loss import dice_ce_loss

    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else ("cpu" if s.device == "auto" else s.device))
    torch.manual_seed(s.seed)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    online = None
    if s.pack:
        from msam_train.online import OnlineCrops
        from msam_train.pack import load_pack

        online = OnlineCrops(pack if pack is not None else load_pack(Path(s.pack)), device, s.thick_slices)
        dataset: list | CropDataset = []
        log(f"online lesion synthesis from {Path(s.pack).name} (sha256 {online.sha256[:12]}...) on {device.type}")
    else:
        from msam_train.data import CropDataset, build_cache

        cache = build_cache(Path(s.data), "training", s.crops_per_lesion, seed=s.seed, log_fn=log, workers=s.workers)
        # on a GPU every crop is held there (6 MB each), so steps never wait for the disk or the CPU
        dataset = CropDataset(cache, augment=True, seed=s.seed, device=device if device.type == "cuda" else None,
                              thick_p=s.thick_slices)
        if len(dataset) == 0:
            raise InvalidDataset(f"no training crops in {s.data}: its training cases hold no lesion (every label is 0)")

    model = build_model(get_config(s.config))
    from_pretrained = s.init is not None
    if from_pretrained:
        fresh = init_from_checkpoint(model, s.init)
        log(f"initialised from {Path(s.init).name}; {len(fresh)} tensors (LoRA/MEA) start fresh"
            + ("; every parameter trains (--train-all)" if s.train_all else ""))
    model = model.to(device).train()
    groups = param_groups(model, s, from_pretrained)
    trainable, total = model.parameter_counts()
    log(f"{s.config}: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable ({100 * trainable / total:.1f}%)"
        + ("" if from_pretrained and not s.train_all else " - the whole encoder trains"))
    for g in groups:
        log(f"  group {g['name']}: {sum(p.numel() for p in g['params']) / 1e6:.2f}M parameters, lr {g['lr']:g}")
    optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    loss_fn = dice_ce_loss

    step, elapsed_before = 0, 0.0
    last_pt = out / "last.pt"
    if s.resume and last_pt.is_file():
        state = torch.load(last_pt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = int(state["step"]), float(state["elapsed"])
        log(f"resumed from step {step}")
    elif s.resume:
        log(f"--resume: no {last_pt} yet, so training starts at step 0")
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=1))

    csv_path = out / "log.csv"
    fields = ["step", "epoch", "seconds", "lr", "loss", "loss_first", "loss_last", "dice_first", "dice_last", "clicks"]
    new_csv = not (s.resume and csv_path.is_file())
    if not new_csv:
        _drop_rows_after(csv_path, step)  # logged after the last save: those steps run again
    csv_file = csv_path.open("w" if new_csv else "a", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=fields)
    if new_csv:
        writer.writeheader()
    tb = None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional

        tb = SummaryWriter(str(out / "tb"))
    except Exception:
        pass

    def save(final: bool = False) -> Path:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "elapsed": elapsed_before + time.time() - t0}, out / "last.pt.tmp")
        (out / "last.pt.tmp").replace(last_pt)
        provenance = {
            "trained_by": "msam train", "config": s.config, "data": Path(s.pack or s.data).name,
            "dataset_seed": None if online else _dataset_seed(Path(s.data)), "steps": step, "batch_size": s.batch_size,
            "iterations": s.iterations, "init": Path(s.init).name if s.init else None,
            "minutes": round((elapsed_before + time.time() - t0) / 60, 1), "final": final,
            "train_crops": len(dataset), "git_commit": _git_commit(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {device.type}", "threads": torch.get_num_threads(),
        }
        if s.thick_slices:
            provenance["thick_slices"] = s.thick_slices
        if online is not None:
            provenance.update(online_synthesis=True, pack_sha256=online.sha256, train_crops=step * s.batch_size)
        model.invalidate_model_id()
        path = save_checkpoint(model, out / "model.safetensors", provenance)
        if s.keep_checkpoints:  # every save kept, for choosing a checkpoint on validation afterwards
            (out / "checkpoints").mkdir(exist_ok=True)
            shutil.copyfile(path, out / "checkpoints" / f"step-{step:06d}.safetensors")
        if on_save is not None:
            on_save(path, step, model)
        return path

    rng = np.random.default_rng([s.seed, step])
    generator = torch.Generator().manual_seed(s.seed + step)
    progress = Progress(s.steps)
    t0 = time.time()
    last_save = t0
    epoch = step * s.batch_size // max(1, len(dataset))
    order: list[int] = []
    while step < s.steps:
        if online is not None:  # fresh lesions, drawn from (seed, step): a resumed run draws what it would have
            image, gt, first = online.batch(np.random.default_rng([s.seed, step, 1]), s.batch_size)
        else:
            if not order:
                dataset.epoch = epoch
                order = np.random.default_rng([s.seed, epoch]).permutation(len(dataset)).tolist()
                epoch += 1
            batch_idx, order = order[: s.batch_size], order[s.batch_size :]
            items = [dataset[i] for i in batch_idx]
            image = torch.stack([x[0] for x in items]).to(device)
            gt = torch.stack([x[1] for x in items]).to(device)
            first = torch.stack([x[2] for x in items]).to(device)
        for g, base in zip(optimizer.param_groups, base_lrs):
            spent = (elapsed_before + time.time() - t0) / (60 * s.max_minutes) if s.max_minutes else 0.0
            g["lr"] = base * lr_factor(step, s.steps, s.warmup, spent)
        with model.autocast():
            loss, stats = interaction_step(model, image, gt, first, s.iterations, loss_fn, rng, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seconds = elapsed_before + time.time() - t0
        row = {"step": step, "epoch": epoch, "seconds": round(seconds, 1), "lr": optimizer.param_groups[0]["lr"],
               "loss": round(float(loss.detach()) / s.iterations, 5), **{k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()}}
        writer.writerow(row)
        csv_file.flush()
        if tb is not None:
            for k in ("loss", "loss_first", "loss_last", "dice_first", "dice_last", "lr"):
                tb.add_scalar(f"train/{k}", row[k], step)
        fraction = max(step / s.steps, seconds / (60 * s.max_minutes)) if s.max_minutes else None
        progress.update(step, f"loss {row['loss']:.4f} dice@last {row['dice_last']:.3f} {seconds / 60:.1f} min", fraction)
        if time.time() - last_save > s.save_every * 60:
            save()
            last_save = time.time()
        if s.max_minutes is not None and seconds > s.max_minutes * 60:
            log(f"\nstopping at step {step}: --max-minutes {s.max_minutes} reached")
            break
    csv_file.close()
    path = save(final=True)
    log(f"\nwrote {path} after {step} steps")
    return path


def _dataset_seed(data: Path) -> int | None:
    manifest = data / "dataset.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("seed")
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train M-SAM on a lesion data set (MSD layout)",
                       description=__doc__.split("\n\n")[0] + " See msam_train/trainer.py for the recipe.")
    p.add_argument("--config", default="msam_small", choices=TRAINABLE_CONFIGS,
                   help="model configuration (msam_core/model/configs.py); the bundled model is msam_small_regions")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="data folder (dataset.json, or images/ + labels/): train on its crop cache")
    source.add_argument("--pack", type=Path, help="a pack written by 'msam data pack': synthesise fresh lesions on "
                        "the training device at every step instead (docs/gpu-training.md)")
    p.add_argument("--init", type=Path, default=None, help="start from these weights (SAM-Med3D .pth, msam .safetensors); "
                   "then only LoRA, MEA, prompt encoder and decoder train. Without it everything trains from scratch")
    p.add_argument("--train-all", action="store_true",
                   help="with --init: train every parameter at --lr (continue a from-scratch network such as the "
                        "bundled one; docs/gpu-training.md) instead of M-SAM's LoRA/MEA/decoder recipe")
    p.add_argument("--out", type=Path, default=Path("runs/msam"), help="run folder (log.csv, last.pt, model.safetensors)")
    p.add_argument("--steps", type=whole_number(1), default=1000, help="optimiser steps")
    p.add_argument("--batch-size", type=whole_number(1), default=2)
    p.add_argument("--iterations", type=whole_number(1), default=11, help="decoder passes per batch (simulated clicks), M-SAM: 11")
    p.add_argument("--lr", type=number(0, exclusive=True), default=None, help=f"LR (LoRA+MEA with --init, default {SAM_LR_ADAPTER:g}; all parameters from scratch, default {SCRATCH_LR:g})")
    p.add_argument("--lr-decoder", type=number(0, exclusive=True), default=None, help=f"LR of prompt encoder + decoder with --init (default {SAM_LR_DECODER:g})")
    p.add_argument("--weight-decay", type=number(0), default=0.1)
    p.add_argument("--warmup", type=whole_number(0), default=50, help="linear warm-up steps")
    p.add_argument("--crops-per-lesion", type=whole_number(1), default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--max-minutes", type=number(0, exclusive=True), default=None, help="stop (and save) after this much training time")
    p.add_argument("--save-every", type=number(0, exclusive=True), default=5.0, help="minutes between checkpoints")
    p.add_argument("--seed", type=whole_number(0), default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep every save as OUT/checkpoints/step-NNNNNN.safetensors (to choose one on validation)")
    p.add_argument("--threads", type=whole_number(1), default=None, help="torch CPU threads")
    p.add_argument("--workers", type=whole_number(1), default=1, help="processes building the crop cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.train_all and args.init is None:
        raise UnsupportedRequest("--train-all continues training from --init CHECKPOINT; give --init "
                                 "(without --init every parameter trains anyway)")
    if args.pack is not None:
        from msam_train.pack import read_meta

        read_meta(args.pack)  # a missing or foreign file fails at once, with what to do
    else:
        from msam_train.data import require_cases

        require_cases(args.data, "training")  # before the crop cache is built: a wrong folder fails at once
    settings = TrainSettings(
        config=args.config, data=str(args.data or ""), pack=str(args.pack) if args.pack else None,
        out=str(args.out), init=str(args.init) if args.init else None, train_all=args.train_all,
        steps=args.steps, batch_size=args.batch_size, iterations=args.iterations,
        lr=args.lr, lr_decoder=args.lr_decoder,
        weight_decay=args.weight_decay, warmup=args.warmup, crops_per_lesion=args.crops_per_lesion, device=args.device,
        max_minutes=args.max_minutes, save_every=args.save_every, seed=args.seed, resume=args.resume, threads=args.threads,
        workers=args.workers, keep_checkpoints=args.keep_checkpoints,
    )
    train(settings)
    return 0
