"""``msam evaluate``: Dice and NSD after 1..N simulated clicks per lesion, against region growing.

Protocol, per lesion (every ``k > 0`` of a case's label map):

1. The first click at the lesion's deepest voxel; the 128^3 crop centred on it exactly as
   :class:`~msam_core.pipeline.segmenter.Segmenter` centres it for ``msam segment`` and the
   service.
2. The model's first pass has no mask prompt (as ``msam segment``); every next click is placed
   at the deepest voxel of the largest error region of the current result (positive on a miss,
   negative on a false positive) and the previous logits are fed back as the mask prompt
   (``--no-feedback``: decode from the clicks alone, as the service does for a job and for each
   interaction of a session). The masks come from the same calls as the service's:
   :meth:`Segmenter.open_crop` once per lesion, then :meth:`Segmenter.click` per click, with the
   checkpoint's pipeline options (decision threshold, stable-region prior, boundary refinement,
   coarse view; :class:`~msam_core.pipeline.options.PipelineOptions`). ``--masks DIR`` writes each
   lesion's mask after each click on the case's own grid, resampled as the service resamples.
3. Metrics on the crop grid (1.5 mm): Dice and normalised surface Dice (NSD, tolerance
   ``--nsd-tolerance`` mm), both MONAI (``compute_dice``, ``compute_surface_dice``).
4. Baseline from the same protocol (own error-driven clicks, same first click): SimpleITK
   ``ConfidenceConnected`` region growing from the positive clicks on the same crop (Gaussian
   smoothing sigma 0.5 voxel, multiplier 2.5, 4 iterations, neighbourhood radius 1 - the best
   one-click Dice of a small grid, sigma 0/0.5/1/curvature flow x multiplier 2/2.5/3, on
   validation lesions), grown from each positive click separately and united; voxels nearer to
   a negative click than to every positive click are removed. A second baseline,
   ``stable_region``: the stable-region prior alone (:mod:`~msam_core.pipeline.region_prior`:
   per positive click the ConfidenceConnected region that changes least across multipliers),
   negatives as above - what msam's masks would be without the network, for models calibrated
   with a prior.
5. Controls: does the model use the image?

   - ``--blank-image-control``: the model on an all-zero crop with the same protocol
     (``msam_blank_image``): what the clicks alone give. A model whose Dice matches it does not
     use the image. With ``click_regions`` a uniform crop is not "no image" (every click's region
     fills its window), so the next control is the one to read.
   - ``--other-image-control``: the model on *another* lesion's crop (the next lesion of the
     split, cyclically; each crop is centred on its own lesion), with the clicks placed for this
     lesion (``msam_other_image``): a real image with a lesion at the first click, but not this
     one. A model that fits the lesion it sees scores low here; one that draws a fixed shape
     around the clicks scores the same as on the right crop.

6. Line protocol (``msam_line``, one interaction): the lesion's RECIST line drawn from the
   expert mask as a radiologist draws it - its longest in-plane diameter on the slice of the
   acquisition plane where that diameter is largest
   (:func:`msam_core.measure.measure_lesion`'s long axis) - turned into prompts exactly as the
   service turns a ``line`` prompt (:mod:`msam_core.pipeline.lines`, ``--line-strategy``): the
   crop centred on the line's midpoint, one pass with the line's clicks. Scored like the click
   protocol, on its own crop grid. ``--no-line``: skip it.

Writes ``per_lesion.csv`` and ``per_lesion.json`` (one row per lesion, method and click count),
``summary.json`` (means by method and click count, overall and per organ/modality; also the
mean of the best Dice so far - a user who undoes every click that made things worse) and
``dice_vs_clicks.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from msam_core.cli.arguments import number, whole_number
from msam_core.errors import InvalidDataset, UnsupportedRequest
from msam_core.io.load import load_volume
from msam_core.pipeline.coarse_view import coarse_grid
from msam_core.pipeline.preprocess import CropGrid, mask_on_grid
from msam_core.pipeline.region_prior import RegionPrior
from msam_train.clicks import first_click, next_click
from msam_train.data import case_name

METHODS = ("msam", "msam_line", "msam_blank_image", "msam_other_image", "region_growing", "stable_region")
#: Lesion-size groups of the summary (equivalent diameter, mm): the decoder's 32^3 logits have
#: 6 mm voxels, so lesions under ~10 mm are a separate regime.
SIZE_GROUPS = (("<10mm", 0.0, 10.0), ("10-20mm", 10.0, 20.0), (">=20mm", 20.0, float("inf")))


@dataclass
class Row:
    split: str
    case: str
    lesion: int
    source: str
    modality: str
    organ: str
    diameter_mm: float
    voxels: int
    method: str
    clicks: int
    dice: float
    nsd: float


def _bbox_crop(pred: np.ndarray, gt: np.ndarray, margin: int = 4) -> tuple[np.ndarray, np.ndarray]:
    union = pred | gt
    if not union.any():
        return pred, gt
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, pred.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return pred[sl], gt[sl]


def _metrics():
    """MONAI's ``compute_dice`` and ``compute_surface_dice``; MONAI comes with the ``train`` extra."""
    try:
        from monai.metrics import compute_dice, compute_surface_dice
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "monai":
            raise
        raise UnsupportedRequest("the evaluation's metrics need the Python package 'monai', which this installation "
                                 "lacks: install msam with its training extra (pip install 'msam[train]'; "
                                 "make install does)") from None
    return compute_dice, compute_surface_dice


def dice_nsd(pred: np.ndarray, gt: np.ndarray, spacing: float = 1.5, tolerance_mm: float = 2.0) -> tuple[float, float]:
    """Dice and normalised surface Dice of two ``bool`` 3D masks, with MONAI's metrics.

    Both are computed on the union's bounding box (plus a margin), which changes neither.
    An empty prediction of a non-empty lesion scores 0 for both.
    """
    compute_dice, compute_surface_dice = _metrics()
    p, g = _bbox_crop(np.asarray(pred, bool), np.asarray(gt, bool))
    if not p.any():
        return 0.0, 0.0
    pt = torch.from_numpy(p)[None, None].float()
    gt_t = torch.from_numpy(g)[None, None].float()
    dice = float(compute_dice(pt, gt_t, include_background=True)[0, 0])
    onehot_p = torch.cat([1 - pt, pt], 1)
    onehot_g = torch.cat([1 - gt_t, gt_t], 1)
    nsd = float(compute_surface_dice(onehot_p, onehot_g, class_thresholds=[tolerance_mm], include_background=False,
                                     spacing=spacing)[0, 0])
    return dice, nsd


def region_growing(image: np.ndarray, points: np.ndarray, labels: np.ndarray, multiplier: float = 2.5,
                   iterations: int = 4, radius: int = 1, sigma: float = 0.5) -> np.ndarray:
    """SimpleITK confidence-connected region growing from the positive clicks (``[a, b, c]``),
    one region per click, united; negative clicks remove the voxels nearer to them."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(image, np.float32))
    if sigma > 0:
        img = sitk.SmoothingRecursiveGaussian(img, sigma)
    shape = np.asarray(image.shape)
    pos = [p for p, lab in zip(points, labels) if lab == 1]
    mask = np.zeros(image.shape, bool)
    for p in pos:  # one region per positive click (one pooled seed set leaks as soon as one seed is on an edge)
        seed = tuple(int(v) for v in np.clip(np.round(p), 0, shape - 1)[::-1])
        grown = sitk.ConfidenceConnected(img, seedList=[seed], numberOfIterations=iterations, multiplier=multiplier,
                                         initialNeighborhoodRadius=radius, replaceValue=1)
        mask |= sitk.GetArrayFromImage(grown).astype(bool)
    return _drop_nearer_to_negatives(mask, points, labels)


def _drop_nearer_to_negatives(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``mask`` without the voxels nearer to a negative click than to every positive one."""
    pos = [p for p, lab in zip(points, labels) if lab == 1]
    neg = [p for p, lab in zip(points, labels) if lab == 0]
    if pos and neg and mask.any():
        idx = np.argwhere(mask)
        d_pos = np.min([np.linalg.norm(idx - p, axis=1) for p in pos], axis=0)
        d_neg = np.min([np.linalg.norm(idx - p, axis=1) for p in neg], axis=0)
        drop = idx[d_neg < d_pos]
        mask[tuple(drop.T)] = False
    return mask


def stable_region_growing(prior: RegionPrior, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The stable-region prior alone as a segmentation: the union of the positive clicks' stable
    regions (:class:`RegionPrior`), negative clicks handled as in :func:`region_growing`."""
    mask = prior.mask(points, labels)
    mask = np.zeros(prior.shape, bool) if mask is None else mask.copy()
    return _drop_nearer_to_negatives(mask, np.asarray(points, float), labels)


def _lesion_meta(data_dir: Path, split: str) -> dict[str, dict]:
    manifest = data_dir / "dataset.json"
    if not manifest.is_file():
        return {}
    out = {}
    for entry in json.loads(manifest.read_text()).get(split, []):
        out[case_name(entry["image"])] = entry
    return out


def _click_protocol(segment, gt: np.ndarray, centre: np.ndarray, grid, clicks: int,
                    tolerance_mm: float) -> list[tuple[float, float]]:
    """Scores after 1..``clicks`` clicks: first click at ``centre``, each next one at the deepest
    voxel of the largest error of ``segment(points, labels) -> bool mask``."""
    pts, labs = [centre], [1]
    scores = []
    for _ in range(clicks):
        pred = segment(np.asarray(pts), np.asarray(labs))
        scores.append(dice_nsd(pred, gt, grid.spacing, tolerance_mm))
        nxt = next_click(pred, gt)
        if nxt is None:
            nxt = (np.asarray(pts[-1]), labs[-1])
        pts.append(np.asarray(nxt[0], float))
        labs.append(int(nxt[1]))
    return scores


def _model_clicks(segmenter, image, gt: np.ndarray, centre: np.ndarray, grid, clicks: int, tolerance_mm: float,
                  feedback: bool, prior: RegionPrior | None = None, coarse_image: torch.Tensor | None = None,
                  on_logits=None) -> list[tuple[float, float]]:
    """The click protocol through :meth:`Segmenter.open_crop` / :meth:`Segmenter.click`.

    ``prior``: the :class:`RegionPrior` of ``image`` to share (default: the Segmenter makes one),
    so that each click's stable region is grown once per lesion. ``coarse_image``: the crop of the
    same place at twice the spacing (:func:`coarse_crop`), when the options turn the coarse view
    on. ``on_logits(clicks, crop logits)``: told every result (``--masks``)."""
    state = segmenter.open_crop(image, grid, coarse_image=coarse_image, prior=prior)

    def segment(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        logits = segmenter.click(state, points, labels, feedback=feedback)
        if on_logits is not None:
            on_logits(len(labels), logits)
        return logits > 0

    return _click_protocol(segment, gt, centre, grid, clicks, tolerance_mm)


def expert_line(gt_volume: np.ndarray, volume) -> np.ndarray:
    """``(2, 3)`` RAS mm: the RECIST line of an expert mask, its long axis as
    :func:`msam_core.measure.measure_lesion` measures it."""
    from msam_core.measure import measure_lesion

    m = measure_lesion(gt_volume, volume)
    return volume.voxel_to_ras(np.array([m.long_axis.start_voxel, m.long_axis.end_voxel]))


def line_protocol(segmenter, sampler, volume, gt_volume: np.ndarray, strategy: str,
                  tolerance_mm: float) -> tuple[float, float]:
    """(Dice, NSD) of one pass prompted by the expert mask's RECIST line (:func:`expert_line`),
    on the crop the Segmenter takes for a line prompt (centred on the line's midpoint)."""
    from msam_core.pipeline.lines import line_points

    points_ras, labels = line_points(expert_line(gt_volume, volume), strategy)
    inside = volume.ras_to_voxel(points_ras)
    inside = np.all((inside >= -0.5) & (inside <= np.asarray(volume.shape) - 0.5), axis=1) | (labels == 1)
    points_ras, labels = points_ras[inside], labels[inside]  # as the service: negatives off the image dropped
    grid = CropGrid.centred(points_ras[0], size=segmenter.model.img_size)
    image = sampler.crop(grid)
    state = segmenter.open_crop(image, grid, coarse_image=coarse_crop(segmenter, sampler, grid))
    logits = segmenter.click(state, grid.ras_to_crop(points_ras), labels)
    return dice_nsd(logits > 0, mask_on_grid(gt_volume, volume, grid), grid.spacing, tolerance_mm)


def volume_mask(logits: np.ndarray, grid: CropGrid, volume) -> np.ndarray:
    """Crop logits ``float32 [S, S, S]`` on ``grid`` -> ``uint8`` mask (1 = lesion) on ``volume``'s
    grid, resampled as the Segmenter resamples a lesion for ``msam segment`` and the service."""
    from msam_core.pipeline.postprocess import combine_lesions, logits_to_volume_grid

    return combine_lesions({1: logits_to_volume_grid(logits, grid.affine, volume)}, volume.shape)


def _rows(template: Row, results: dict[str, list[tuple[float, float]]]) -> list[Row]:
    return [replace(template, method=method, clicks=c, dice=round(d, 4), nsd=round(s, 4))
            for method, scores in results.items() for c, (d, s) in enumerate(scores, start=1)]


def lesion_crop(sampler, volume, gt_volume: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, CropGrid]:
    """The crop :class:`Segmenter` would take for a first click at the lesion's deepest voxel:
    ``(image [1, 1, S, S, S], mask on the crop grid, click in crop voxels, grid)``."""
    start = first_click(gt_volume)
    grid = CropGrid.centred(volume.voxel_to_ras(start)[0], size=size)
    return (sampler.crop(grid), mask_on_grid(gt_volume, volume, grid), grid.ras_to_crop(volume.voxel_to_ras(start))[0],
            grid)


def coarse_crop(segmenter, sampler, grid: CropGrid) -> torch.Tensor | None:
    """The crop of ``grid``'s place at twice the spacing, when ``segmenter``'s options turn the
    coarse view on (:mod:`~msam_core.pipeline.coarse_view`), else ``None``. Cut once per lesion and
    kept for the other-image control."""
    return sampler.crop(coarse_grid(grid)) if segmenter.options.coarse_view else None


def evaluate_lesion(segmenter, crop: tuple[torch.Tensor, np.ndarray, np.ndarray, CropGrid], clicks: int,
                    tolerance_mm: float, feedback: bool = True, baseline: bool = True,
                    blank_control: bool = False, coarse_image: torch.Tensor | None = None,
                    on_logits=None) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(dice, nsd) after 1..clicks clicks]}`` for one lesion's ``crop`` (:func:`lesion_crop`).

    ``blank_control``: also run the model on an all-zero crop with the same protocol
    (``msam_blank_image``) - what the clicks alone give; a model that matches it ignores the image.
    ``coarse_image``: :func:`coarse_crop` of the lesion's crop (options with ``coarse_view``).
    ``on_logits(clicks, crop logits)``: told msam's result after every click.
    """
    image, gt, centre, grid = crop
    prior = segmenter.new_prior(image)  # msam's and the stable-region baseline's: each region grown once
    results: dict[str, list[tuple[float, float]]] = {}
    results["msam"] = _model_clicks(segmenter, image, gt, centre, grid, clicks, tolerance_mm, feedback, prior,
                                    coarse_image, on_logits)
    if blank_control:
        blank_coarse = None if coarse_image is None else torch.zeros_like(coarse_image)
        results["msam_blank_image"] = _model_clicks(segmenter, torch.zeros_like(image), gt, centre, grid, clicks,
                                                    tolerance_mm, feedback, coarse_image=blank_coarse)
    if baseline:
        raw = image[0, 0].numpy()
        results["region_growing"] = _click_protocol(lambda pts, labs: region_growing(raw, pts, labs), gt, centre,
                                                    grid, clicks, tolerance_mm)
        results["stable_region"] = _click_protocol(lambda pts, labs: stable_region_growing(prior, pts, labs), gt,
                                                   centre, grid, clicks, tolerance_mm)
    return results


def evaluate(data_dir: Path, checkpoint: Path | None, split: str = "validation", clicks: int = 5,
             out_dir: Path | None = None, tolerance_mm: float = 2.0, device: str = "cpu", feedback: bool = True,
             baseline: bool = True, model=None, log=print, blank_control: bool = False,
             other_image_control: bool = False, embedding_cache=None, masks_dir: Path | None = None,
             line: bool = True, line_strategy: str | None = None) -> dict:
    """Evaluate every lesion of ``split``; writes the reports into ``out_dir`` and returns the summary.

    ``model``: a :class:`~msam_core.checkpoints.LoadedModel` (network and pipeline options) to
    use instead of loading ``checkpoint``. ``embedding_cache`` (an
    :class:`~msam_core.pipeline.segmenter.EmbeddingCache`): shared by repeated evaluations of the
    same weights (``msam calibrate``), so each crop is encoded once. ``masks_dir``: write msam's
    mask of every lesion after every click there (:func:`volume_mask`), as
    ``<case>_lesion<k>_click<n>.nii.gz`` on the case's grid.

    ``other_image_control`` needs at least two lesions (each is run on the next one's crop).
    ``line``: also the line protocol (``msam_line``), its line turned into clicks by
    ``line_strategy`` (default :data:`msam_core.pipeline.lines.DEFAULT_STRATEGY`)."""
    from msam_core.pipeline.lines import DEFAULT_STRATEGY, STRATEGIES

    line_strategy = line_strategy or DEFAULT_STRATEGY
    if line_strategy not in STRATEGIES:
        raise UnsupportedRequest(f"unknown line strategy {line_strategy!r}; use one of {', '.join(STRATEGIES)}")
    _metrics()  # a missing MONAI fails before any work
    from msam_core.checkpoints import load_model
    from msam_core.pipeline.segmenter import Segmenter
    from msam_train.data import require_cases

    data_dir = Path(data_dir)
    cases = require_cases(data_dir, split)  # before the model loads: a wrong folder or split fails at once
    for folder in (out_dir, masks_dir):  # a folder that cannot be made fails before the work, not after it
        if folder is not None:
            _check_writable(Path(folder))
    if model is None:
        model = load_model(checkpoint, device=device)
    segmenter = Segmenter(model.network, model.options, device=device, cache=embedding_cache)
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    meta = _lesion_meta(data_dir, split)
    rows: list[Row] = []
    #: with other_image_control: (row template, crop, mask, first click, grid, coarse crop) per lesion
    kept: list[tuple[Row, torch.Tensor, np.ndarray, np.ndarray, CropGrid, torch.Tensor | None]] = []
    t0 = time.time()
    for n, case in enumerate(cases):
        volume = load_volume(case.image)
        labels = np.asarray(load_volume(case.label).array)
        sampler = segmenter.sampler(volume)
        entry = meta.get(case.name, {})
        infos = {int(x["label"]): x for x in entry.get("lesions", [])}
        for k in (int(v) for v in np.unique(labels) if v > 0):
            gt = labels == k
            crop = lesion_crop(sampler, volume, gt, segmenter.model.img_size)
            coarse = coarse_crop(segmenter, sampler, crop[3])
            on_logits = None
            if masks_dir is not None:
                def on_logits(n: int, logits: np.ndarray, case=case, k=k, grid=crop[3], volume=volume) -> None:
                    from msam_core.io.nifti import save_mask_nifti

                    save_mask_nifti(volume_mask(logits, grid, volume), volume,
                                    Path(masks_dir) / f"{case.name}_lesion{k}_click{n}.nii.gz")
            res = evaluate_lesion(segmenter, crop, clicks, tolerance_mm, feedback, baseline, blank_control, coarse,
                                  on_logits)
            if line:
                res["msam_line"] = [line_protocol(segmenter, sampler, volume, gt, line_strategy, tolerance_mm)]
            info = infos.get(k, {})
            template = Row(split, case.name, k, entry.get("source", ""), entry.get("modality", ""),
                           info.get("organ", ""), float(info.get("diameter_mm", 0.0)), int(gt.sum()), "", 0, 0.0, 0.0)
            rows += _rows(template, res)
            if other_image_control:
                kept.append((template, *crop, coarse))
        log(f"evaluate {split}: {n + 1}/{len(cases)} cases ({time.time() - t0:.0f} s)")
    if not rows:
        raise InvalidDataset(f"the {split} cases in {data_dir} hold no lesion (every label is 0): nothing to evaluate")
    if other_image_control and len(kept) < 2:
        raise UnsupportedRequest(f"--other-image-control needs at least two lesions (each is run on the next one's "
                                 f"crop); split {split!r} has {len(kept)}: leave the control out for this split")
    for i, (template, _, gt, centre, grid, _) in enumerate(kept):
        _, other, *_, other_coarse = kept[(i + 1) % len(kept)]
        scores = _model_clicks(segmenter, other, gt, centre, grid, clicks, tolerance_mm, feedback,
                               coarse_image=other_coarse)
        rows += _rows(template, {"msam_other_image": scores})
    if kept:
        log(f"evaluate {split}: other-image control done ({time.time() - t0:.0f} s)")
    summary = summarise(rows, clicks)
    summary.update({"split": split, "data": data_dir.name, "checkpoint": Path(checkpoint).name if checkpoint else None,
                    "nsd_tolerance_mm": tolerance_mm, "feedback": feedback,
                    "line_strategy": line_strategy if line else None, "lesions": len({(r.case, r.lesion) for r in rows})})
    if out_dir is not None:
        write_reports(Path(out_dir), rows, summary)
    return summary


def summarise(rows: list[Row], clicks: int) -> dict:
    def means(selected: list[Row]) -> dict:
        out: dict = {}
        for method in METHODS:
            m = [r for r in selected if r.method == method]
            if not m:
                continue
            per_lesion: dict[tuple[str, int], list[float]] = {}
            for r in sorted(m, key=lambda r: r.clicks):
                per_lesion.setdefault((r.case, r.lesion), []).append(r.dice)
            best = np.maximum.accumulate(np.asarray(list(per_lesion.values())), axis=1).mean(0)
            steps = sorted({r.clicks for r in m})  # 1..clicks; the line protocol has one interaction
            out[method] = {
                "dice": [round(float(np.mean([r.dice for r in m if r.clicks == c])), 4) for c in steps],
                "nsd": [round(float(np.mean([r.nsd for r in m if r.clicks == c])), 4) for c in steps],
                # a user who undoes every click that made the result worse (an upper bound)
                "dice_best_so_far": [round(float(v), 4) for v in best],
                "lesions": len(per_lesion),
            }
        return out

    groups: dict = {"all": means(rows)}
    for key in ("organ", "modality"):
        for value in sorted({getattr(r, key) for r in rows if getattr(r, key)}):
            groups[f"{key}={value}"] = means([r for r in rows if getattr(r, key) == value])
    for name, lo, hi in SIZE_GROUPS:
        selected = [r for r in rows if r.diameter_mm > 0 and lo <= r.diameter_mm < hi]
        if selected:
            groups[f"diameter={name}"] = means(selected)
    return {"clicks": clicks, "groups": groups}


def _check_writable(folder: Path) -> None:
    """Refuse a report folder that could not be made or written (a file in its way, a read-only
    place), without making it: a run refused later for another reason leaves nothing behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not existing.is_dir() else "cannot be written"
        raise UnsupportedRequest(f"cannot write to {folder}: {existing} {what}; choose another --out / --masks folder")


def write_reports(out: Path, rows: list[Row], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "per_lesion.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    (out / "per_lesion.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_dice_vs_clicks(summary, out / "dice_vs_clicks.png")


def plot_dice_vs_clicks(summary: dict, path: Path, size: tuple[int, int] = (640, 420)) -> Path:
    """A line plot of mean Dice after 1..N clicks per method (Pillow only)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 60, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    n = int(summary["clicks"])
    groups = summary["groups"]["all"]

    def xy(click: int, value: float) -> tuple[float, float]:
        x = left + (click - 1) / max(1, n - 1) * (w - left - right)
        return x, top + (1 - value) * (h - top - bottom)

    for v in np.linspace(0, 1, 6):
        _, y = xy(1, v)
        draw.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        draw.text((10, y - 6), f"{v:.1f}", fill="black", font=font)
    for c in range(1, n + 1):
        x, _ = xy(c, 0)
        draw.text((x - 3, h - bottom + 8), str(c), fill="black", font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text((w // 2 - 30, h - 22), "clicks", fill="black", font=font)
    draw.text((left, 12), f"mean Dice vs clicks ({summary.get('split', '')}, {summary.get('lesions', '?')} lesions)", fill="black", font=font)
    colours = {"msam": (200, 30, 30), "msam_line": (140, 30, 160), "msam_blank_image": (150, 150, 150), "msam_other_image": (230, 150, 30),
               "stable_region": (30, 140, 60),
               "region_growing": (30, 80, 200)}
    for i, (method, stats) in enumerate(groups.items()):
        line = [xy(c + 1, v) for c, v in enumerate(stats["dice"])]
        if len(line) > 1:
            draw.line(line, fill=colours.get(method, "black"), width=3)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours.get(method, "black"))
        draw.text((w - right - 150, top + 10 + 16 * i), f"- {method}", fill=colours.get(method, "black"), font=font)
    img.save(path)
    return path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice/NSD after 1..N simulated clicks, vs region growing",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="data folder (dataset.json, or images/ + labels/)")
    p.add_argument("--checkpoint", type=Path, default=None, help="model weights (default: the bundled model)")
    p.add_argument("--split", default="validation", help="dataset.json list: validation (default), heldout, training")
    p.add_argument("--clicks", type=whole_number(1), default=5, help="clicks per lesion (default 5)")
    p.add_argument("--out", type=Path, default=Path("eval"), help="report folder")
    p.add_argument("--nsd-tolerance", type=number(0, exclusive=True), default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-feedback", action="store_true", help="do not feed the previous logits back")
    p.add_argument("--no-baseline", action="store_true", help="skip region growing")
    p.add_argument("--blank-image-control", action="store_true",
                   help="also run the model on an all-zero crop (msam_blank_image): does it use the image at all?")
    p.add_argument("--masks", type=Path, default=None, metavar="DIR",
                   help="also write msam's mask of every lesion after every click into DIR "
                        "(<case>_lesion<k>_click<n>.nii.gz, on the case's grid): to look at what it drew")
    p.add_argument("--no-line", action="store_true",
                   help="skip the line protocol (msam_line: one pass prompted by the lesion's RECIST line, drawn "
                        "from the expert mask)")
    p.add_argument("--line-strategy", default=None,
                   help="how a line becomes clicks: midpoint, three, five or three_bounded (default: the service's)")
    p.add_argument("--other-image-control", action="store_true",
                   help="also run the model on the next lesion's crop with this lesion's clicks (msam_other_image): "
                        "does it fit the lesion it sees? Needs two or more lesions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from msam_core.cli.segment import DEFAULT_CHECKPOINT

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    summary = evaluate(args.data, checkpoint, args.split, args.clicks, args.out, args.nsd_tolerance, args.device,
                       not args.no_feedback, not args.no_baseline, blank_control=args.blank_image_control,
                       other_image_control=args.other_image_control, masks_dir=args.masks,
                       line=not args.no_line, line_strategy=args.line_strategy)
    for method, stats in summary["groups"]["all"].items():
        nsd = f"NSD@1 {stats['nsd'][0]:.3f}" + (f", @{len(stats['nsd'])} {stats['nsd'][-1]:.3f}"
                                                 if len(stats["nsd"]) > 1 else "")
        print(f"{method}: Dice " + " ".join(f"@{i + 1} {v:.3f}" for i, v in enumerate(stats["dice"])) + f" ({nsd})")
    print(f"wrote {args.out}")
    return 0
