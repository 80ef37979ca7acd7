"""Package a training run as the bundled default model: copy the weights, write the model card.

``python -m msam_train.card --run RUN --data DATA --out msam_core/weights`` reads
``RUN/settings.json``, ``RUN/log.csv``, ``RUN/model.safetensors`` and the evaluation summaries
``RUN/eval_<split>/summary.json``, and writes ``OUT/msam_default.safetensors`` (``--weights``: another
checkpoint of the run, such as ``make model``'s calibrated copy) and ``OUT/MODEL_CARD.md``. Every
number in the card comes from those files.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import msam_core
from msam_core.pipeline.region_prior import MIN_VOXELS
from msam_train.sources import LICENCES

MAX_BYTES = 25 * 1024 * 1024


def _loss_curve(log_csv: Path, points: int = 8) -> list[dict]:
    rows = list(csv.DictReader(log_csv.open()))
    if not rows:
        return []
    size = max(1, len(rows) // points)
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        out.append({"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}",
                    "minutes": round(float(chunk[-1]["seconds"]) / 60, 1),
                    "loss": round(sum(float(r["loss"]) for r in chunk) / len(chunk), 4),
                    "dice_last": round(sum(float(r["dice_last"]) for r in chunk) / len(chunk), 3)})
    return out


def _metrics_table(summary: dict) -> str:
    lines = ["| lesions | method | Dice@1 | Dice@3 | Dice@5 | best-so-far Dice@5 | NSD@1 | NSD@5 |",
             "|---|---|---|---|---|---|---|---|"]
    for group, stats in summary["groups"].items():
        for method, s in stats.items():
            d, n, b = s["dice"], s["nsd"], s.get("dice_best_so_far", [])
            at = lambda v, k: f"{v[k - 1]:.3f}" if len(v) >= k else "-"  # noqa: E731
            lines.append(f"| {group} ({s['lesions']}) | {method} | {at(d, 1)} | {at(d, 3)} | {at(d, 5)} | {at(b, 5)} | "
                         f"{at(n, 1)} | {at(n, 5)} |")
    return "\n".join(lines)


#: evaluation splits read from RUN/eval_<split>/summary.json, in the card's order
SPLIT_TITLES = {
    "validation": "Synthetic validation set (training sources, unseen lesions)",
    "heldout": "Lesions inserted into the held-out scan (chest CTA never seen in training)",
    "validation_thick": "Synthetic validation set as 4.5 mm axial slabs (thick-slice copies, `msam_train/thick.py`)",
    "heldout_thick": "Held-out scan's lesions as 4.5 mm axial slabs (thick-slice copies)",
    "real": "Real tumours (PyRadiomics test cases, never seen in training)",
}


def _machine(prov: dict) -> str:
    machine = prov.get("machine", "")
    if machine.endswith("cuda"):
        return "a GPU"
    if not machine:
        return "an unrecorded machine"
    return f"a CPU ({prov['threads']} threads)" if prov.get("threads") else "a CPU"


def _paired(report: Path, baseline: str = "region_growing") -> tuple[str, str]:
    """Verdicts at the first and last click from ``msam compare`` (msam minus ``baseline``,
    paired bootstrap 95% interval over the report's lesions), worded for the card."""
    from msam_train.compare import compare, direction, read_dice

    rows = compare(read_dice(report, baseline), read_dice(report, "msam"))
    words = {1: "msam better", -1: f"{baseline.replace('_', ' ')} better", 0: "no clear difference"}

    def phrase(d) -> str:
        return f", paired difference {d.diff:+.3f} (95% interval {d.low:+.3f} to {d.high:+.3f}): {words[direction(d)]}"

    return phrase(rows[0]), phrase(rows[-2])  # first and last click; rows[-1] is the mean over clicks


def _prior(options, prov: dict) -> str:
    """The Model section's sentence on the stable-region prior (``options``: the checkpoint's
    pipeline options), with its calibration table."""
    if options is None or not (options.prior_weight_first or options.prior_weight):
        return ""
    cal = prov.get("calibration", {})
    table = "; ".join(f"{k}: {v['mean_dice']:.3f}" for k, v in cal.get("prior_table", {}).items())
    return ("The pipeline adds a stable-region prior to the upsampled logits "
            "(`msam_core/pipeline/region_prior.py`): per positive click the SimpleITK ConfidenceConnected region "
            f"that changes least from one multiplier to the next (MSER-style, {MIN_VOXELS:,} to {options.prior_max_voxels:,} voxels), weighted "
            f"{options.prior_weight_first:g} for a lesion prompted by one positive click and {options.prior_weight:g} "
            "after further clicks; the network's weights are unchanged. The weights were chosen by `msam calibrate "
            f"--prior-weights` on the {cal.get('split', 'validation')} split (mean Dice over clicks 1..{cal.get('clicks', '?')} "
            f"per FIRST,LATER pair: {table or 'not recorded'}{_kept(cal.get('prior_choice', {}))}). ")


def _voxels(n: int) -> str:
    return f"{n} voxel" + ("" if n == 1 else "s")


def _boundary(options, prov: dict) -> str:
    """The Model section's sentence on the boundary refinement, with its calibration table."""
    if options is None or not (options.boundary_band_first or options.boundary_band):
        return ""
    cal = prov.get("calibration", {})
    table = "; ".join(f"{k}: {v['mean_dice']:.3f}" for k, v in cal.get("boundary_table", {}).items())
    first = (f"{_voxels(options.boundary_band_first)} for a lesion prompted by one positive click"
             if options.boundary_band_first else "none for a lesion prompted by one positive click")
    return ("Then a random walker (Grady 2006, scikit-image) moves the mask's boundary onto the image's edges at "
            "full resolution (`msam_core/pipeline/boundary.py`): seeds are the mask's voxels deeper than a band "
            "(inside; half the mask's depth for a small mask), everything farther out than the band (outside) and "
            f"the clicks; the band's half-width is {first} and {_voxels(options.boundary_band)} after further "
            f"clicks, chosen by `msam calibrate --boundary-bands` on the {cal.get('split', 'validation')} split "
            f"(mean Dice over clicks 1..{cal.get('clicks', '?')} per FIRST,LATER pair: {table or 'not recorded'}"
            f"{_kept(cal.get('boundary_choice', {}))}). ")


def _coarse(options, prov: dict) -> str:
    """The Model section's sentence on the coarse view, with the scores it was set on."""
    if options is None or not options.coarse_view:
        return ""
    cal = prov.get("calibration", {})
    record = cal.get("coarse_view", {})
    table = record.get("table", {})
    scores = (f"mean Dice over clicks 1..{cal.get('clicks', '?')}: off {table['off']['mean_dice']:.3f}, on "
              f"{table['on']['mean_dice']:.3f}, on minus off {record['difference']:+.3f} (95% interval "
              f"{record['interval'][0]:+.3f} to {record['interval'][1]:+.3f})"
              if "off" in table and "on" in table else "scores not recorded")
    return ("Last, a second look at twice the spacing (`msam_core/pipeline/coarse_view.py`): the mean of the 1.5 mm "
            "and the 3 mm view's logits is a second candidate, finished the same way, and per click the candidate "
            "whose mask has the higher contrast-to-noise ratio against a 3-voxel shell is kept; set with `msam "
            f"calibrate --coarse-view on`, measured on the {cal.get('split', 'validation')} split ({scores}). ")


def _kept(choice: dict) -> str:
    """Why the checkpoint's own pair (prior weights, boundary bands) stayed although another pair
    scored higher, if so."""
    if not choice or choice.get("chosen") == choice.get("best"):
        return ""
    low, high = choice["interval"]
    return (f"; {choice['best']} scored {choice['difference']:+.3f} over the checkpoint's own {choice['incumbent']} "
            f"(95% interval {low:+.3f} to {high:+.3f}), no clear gain, so {choice['incumbent']} was kept")


def read_evals(run: Path) -> dict:
    """``{split: summary}`` of the run's ``eval_<split>/summary.json`` reports, in the card's order."""
    paths = {split: run / f"eval_{split}" / "summary.json" for split in SPLIT_TITLES}
    return {split: json.loads(path.read_text()) for split, path in paths.items() if path.is_file()}


#: How the card's figures relate to what users get (the card's Metrics section states it).
SERVED_PATH = ("These masks come from the calls `msam segment` and the service make - `Segmenter(network, options)` "
               "with the pipeline options this file states, `open_crop` then `click` - so the service returns "
               "them voxel for voxel (`tests/integration/test_served_path.py`). The protocol differs: here each "
               "click's logits are fed back as the next click's mask prompt, while the service decodes every request "
               "from its clicks alone, a `POST /segment` job and each interaction of a session alike (a session's "
               "answer is the job's for the same clicks, whichever worker computes it); `bench/served_accuracy.py` "
               "measures that protocol through the running service.")


def metrics_section(run: Path, evals: dict, config) -> list[str]:
    """The card's Metrics section (markdown lines) from the run's ``eval_<split>`` reports (``evals``:
    their summaries by split) and the shipped model's ``config``."""
    md = [
        "## Metrics",
        "`msam evaluate` (first click at the lesion's deepest voxel, each next click at the deepest voxel of the "
        "largest error region, previous logits fed back; NSD tolerance 2 mm). Baseline: SimpleITK "
        "ConfidenceConnected region growing from the same click protocol on the same crops"
        + ("; second baseline `stable_region`: the stable-region prior alone from the same protocol (what the "
           "masks would be without the network)." if any("stable_region" in e["groups"]["all"] for e in evals.values())
           else "."),
        "",
        SERVED_PATH,
        "",
    ]
    for split, summary in evals.items():
        a = summary["groups"]["all"]
        if "msam" in a and "region_growing" in a:
            m, r = a["msam"]["dice"], a["region_growing"]["dice"]
            k = len(m)
            first, last = _paired(run / f"eval_{split}")
            line = (f"- **{split}**: Dice@1 {m[0]:.3f} (msam) vs {r[0]:.3f} (region growing){first} at one click; "
                    f"Dice@{k} {m[-1]:.3f} vs {r[-1]:.3f}{last}.")
            if "stable_region" in a:
                g = a["stable_region"]["dice"]
                first, last = _paired(run / f"eval_{split}", "stable_region")
                line += (f" The stable-region prior alone: Dice@1 {g[0]:.3f}{first}; Dice@{k} {g[-1]:.3f}{last}.")
            if "msam_blank_image" in a:
                b = a["msam_blank_image"]["dice"]
                line += f" The same model on a blank (all-zero) crop: Dice@1 {b[0]:.3f}, Dice@{k} {b[-1]:.3f}."
            if "msam_other_image" in a:
                o = a["msam_other_image"]["dice"]
                line += f" On another lesion's crop with this lesion's clicks: Dice@1 {o[0]:.3f}, Dice@{k} {o[-1]:.3f}."
            md.append(line)
    if evals:
        md += ["", "Region growing gets worse after its first click: the next click lands in the largest error, "
               "often at a lesion edge, and a region grown from an edge voxel (whose neighbourhood mixes lesion and "
               "organ) leaks into the organ; the best-so-far column (a user who undoes such clicks) is its fairer "
               "figure. "
               + ("Real tumours: the five clinical cases PyRadiomics ships (`msam data real`; brain MR x2, breast "
                  "MR, lung CT x2) - real anatomy and real outlines, but five lesions: a sanity check, not a "
                  "clinical validation." if "real" in evals else
                  "No real-tumour data was evaluated: real CT/MR tumours were not measured."), ""]
    if any("msam_other_image" in e["groups"]["all"] for e in evals.values()):
        md += ["**Other-image control** (`msam_other_image` rows): the model run on the next lesion's crop (a real "
               "image with a lesion at the first click, but not this one) with this lesion's clicks. A model that "
               "fits the lesion it sees scores low here; one that draws a fixed shape around the clicks scores as "
               "on the right crop.", ""]
    if any("msam_blank_image" in e["groups"]["all"] for e in evals.values()):
        md += ["**Image-use control** (`msam_blank_image` rows): the model run on an all-zero crop with the same "
               "clicks. Where its Dice matches the real run, the model's masks come from the clicks (a learned "
               "shape prior around them), not from the image - compare before reading the region-growing "
               "comparison as image understanding."
               + (" With `click_regions` the control is not the clicks alone: on a uniform crop every click's "
                  "region fills its whole 108 mm window, so the control predicts a large blob, which can beat "
                  "the real run at one click on lesions >= 20 mm that the model under-segments."
                  if config is not None and config.click_regions else ""), ""]
    for split, summary in evals.items():
        md += [f"### {SPLIT_TITLES[split]}", "", _metrics_table(summary), ""]
    if not evals:
        md += ["Not evaluated.", ""]
    return md


def write_card(run: Path, data: Path, out: Path, command: str, weights: Path | None = None) -> Path:
    """``weights``: the checkpoint to ship (default ``RUN/model.safetensors``; ``make model`` gives
    the calibrated copy)."""
    settings = json.loads((run / "settings.json").read_text())
    dataset = json.loads((data / "dataset.json").read_text())
    weights = Path(weights) if weights is not None else run / "model.safetensors"
    if weights.stat().st_size > MAX_BYTES:
        raise ValueError(f"{weights} is {weights.stat().st_size / 1e6:.1f} MB, over the 25 MB budget")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / "msam_default.safetensors")
    from msam_core.checkpoints import options_from_meta, read_weights

    _, config, meta = read_weights(weights)
    options = options_from_meta(meta, weights.name)
    prov = meta.get("provenance", {})
    curve = _loss_curve(run / "log.csv")
    evals = read_evals(run)
    counts = {k: len(dataset.get(k, [])) for k in ("training", "validation", "heldout")}
    lesions = {k: sum(len(e["lesions"]) for e in dataset.get(k, [])) for k in counts}
    sources = "\n".join(f"- `{s['name']}` ({s['modality']}{', held out' if s['heldout'] else ''}): organs "
                        f"{', '.join(s['organs'])}." for s in dataset["sources"])
    md = [
        "# msam default model (`msam_default.safetensors`)",
        "",
        "**Intended use: demonstration and integration testing of msam. Not for clinical use** - it was "
        f"trained for {prov.get('minutes', '?')} minutes on {_machine(prov)}, "
        f"{'from ' + Path(settings['init']).name if settings.get('init') else 'from scratch'}, on synthetic lesions only.",
        "",
        "## Model",
        f"- Architecture: `{settings['config']}` (M-SAM: SAM-Med3D ViT encoder + LoRA + Mask-Enhanced Adapter, "
        "reduced widths/depths), 128^3 crops of 1.5 mm, 32^3 logits upsampled. "
        + ("Stride-4 image features from a three-layer convolutional stem, with each position's similarity to the "
           "features at the clicks, are added to the decoder's upscaling (`high_res_features`, as SAM 2 adds "
           "high-resolution features). " if config is not None and config.high_res_features else "")
        + ("The same stage also gets intensity regions grown from the clicks (max-product paths of intensity "
           "affinity on 3 mm cells, one per click, an exponentiated geodesic distance as in DeepIGeoS; `click_regions`), a "
           "parameter-free cue for the lesion's extent. " if config is not None and config.click_regions else "")
        + ("Those regions are also added to the logits directly (`region_logits`), weighted per prompt by a "
           "linear map of the first mask token that starts at zero on top of learned weights that start at the "
           "middle scale's region, so the first prediction follows the cue from the start. "
           if config is not None and config.region_logits else "")
        + (f"Input transform `{config.input_transform}` on the normalised crop. "
           if config is not None and config.input_transform != "none" else "")
        + _prior(options, prov)
        + _boundary(options, prov)
        + _coarse(options, prov)
        +
        f"{'Initialised from ' + settings['init'] if settings.get('init') else 'No pretrained encoder exists for this size, so it was trained from scratch with every parameter trainable (not the LoRA-only recipe, which needs SAM-Med3D weights).'}",
        f"- Weights: safetensors, {weights.stat().st_size / 1e6:.1f} MB, msam format with provenance metadata "
        f"(steps {prov.get('steps')}, {prov.get('minutes')} min, git {prov.get('git_commit') or 'n/a'}).",
        "",
        "## Data",
        f"`msam data synth --seed {dataset.get('seed')}`: synthetic tumours (irregular deformed ellipsoids, "
        "lobulation, satellites, texture, hypo/hyper contrast, rims, necrotic cores, partial-volume blur, 3-60 mm) "
        "inserted into liver, kidney, pancreas, lung (CT, MR) and brain (MR) of real scans fetched with pip:",
        "",
        sources,
        "",
        f"Cases (lesions): training {counts['training']} ({lesions['training']}), validation {counts['validation']} "
        f"({lesions['validation']}), held-out scan {counts['heldout']} ({lesions['heldout']}). "
        f"{prov.get('train_crops', '?')} cached training crops (crops centred on a lesion voxel = the first click, "
        "exactly as `msam segment` crops).",
        "",
        "## Training",
        "```",
        command,
        "```",
        f"Batch {settings['batch_size']}, {settings['iterations']} decoder passes per batch"
        f"{' (M-SAM uses 11; fewer here to see more crops in the CPU budget)' if settings['iterations'] < 11 else ''}, "
        f"{settings.get('crops_per_lesion', '?')} cached crops per lesion, AdamW (weight decay 0.1), LR "
        f"{settings.get('lr') or 4e-4:g} with warm-up and cosine decay, DiceCE summed over passes, "
        "error-region click simulation, mask-prompt dropout, flips and intensity augmentation.",
        "",
        "Loss curve (mean per-pass DiceCE over blocks of steps; `dice_last` = training Dice of the last pass):",
        "",
        "| steps | minutes | loss | dice_last |",
        "|---|---|---|---|",
        *[f"| {c['steps']} | {c['minutes']} | {c['loss']} | {c['dice_last']} |" for c in curve],
        "",
    ]
    md += metrics_section(run, evals, config)
    md += [
        "## Limitations",
        "- Synthetic lesions only; real tumours differ (mass effect, vessels, heterogeneous enhancement).",
        "- Few source scans (one CT abdomen, one MR abdomen, one brain template); little anatomical variety.",
        "- 32^3 logits (6 mm) limit the accuracy on lesions under ~10 mm.",
        "",
        "## Licences of the source data",
        *[f"- {v}" for v in LICENCES.values()],
        "",
    ]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(msam_core.__file__).resolve().parent / "weights")
    p.add_argument("--command", default="make model")
    p.add_argument("--weights", type=Path, default=None, help="checkpoint to ship (default RUN/model.safetensors)")
    args = p.parse_args(argv)
    print(f"wrote {write_card(args.run, args.data, args.out, args.command, args.weights)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
