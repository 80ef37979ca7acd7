"""Training data: MSD data sets or plain image/label folders, and a cache of network-ready crops.

Layouts read by :func:`list_cases`:

- **MSD**: ``DIR/dataset.json`` with ``training`` (and optionally ``validation``, ``heldout``)
  lists of ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``.
- **plain**: ``DIR/images/NAME.nii.gz`` and ``DIR/labels/NAME.nii.gz`` (same names); every case
  is "training".

Labels are instance maps: every distinct value ``k > 0`` is one lesion (a binary mask is one
lesion).

The **crop cache** (``DIR/cache/<split>/``) holds, per lesion, a few 128^3 crops made exactly as
inference makes them (:class:`msam_core.pipeline.preprocess.VolumeSampler`: RAS axes, 1.5 mm,
CT clamp, z-score over > 0), each centred on a lesion voxel - the crop centre is the first click,
as in :class:`msam_core.pipeline.segmenter.Segmenter`, whose crop is centred on the first positive
click. Centres are drawn with probability proportional to the depth inside the lesion (distance
to its border), so clicks near the middle are common and clicks near the edge occur. Images are
stored as float16, masks as uint8; epochs read them memory-mapped and never touch the raw volumes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from msam_core.errors import InvalidDataset
from msam_train.clicks import border_depth

log = logging.getLogger(__name__)

CACHE_VERSION = "msam-crops-v2"  # v2: crop centres seeded per case


@dataclass(frozen=True)
class CaseRef:
    name: str
    image: Path
    label: Path
    split: str


#: the file formats ``load_volume`` reads by name (NIfTI, NRRD)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


def case_name(path: str | Path) -> str:
    """A case's name: its file name without the image suffix (``lung1.nrrd`` -> ``lung1``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_cases(data_dir: Path, split: str = "training") -> list[CaseRef]:
    """The cases of ``split`` in an MSD or plain data folder."""
    data_dir = Path(data_dir)
    manifest = data_dir / "dataset.json"
    if manifest.is_file():
        entries = json.loads(manifest.read_text()).get(split, [])
        return [CaseRef(case_name(e["image"]), (data_dir / e["image"]).resolve(), (data_dir / e["label"]).resolve(), split)
                for e in entries]
    images = data_dir / "images"
    if images.is_dir() and split == "training":
        refs = []
        for path in sorted(images.iterdir()):
            label = data_dir / "labels" / path.name
            if label.is_file():
                refs.append(CaseRef(path.name.split(".")[0], path, label, split))
        return refs
    return []


def require_cases(data_dir: Path, split: str) -> list[CaseRef]:
    """:func:`list_cases`, refusing a folder it cannot use with :class:`InvalidDataset` (a message that
    says what is wrong and what to give): a missing folder, neither layout, an unreadable
    ``dataset.json``, a split without cases (naming the splits there are) or a listed file that
    does not exist. Commands call it before any slow work."""
    data_dir = Path(data_dir)
    made_by = "the folder 'msam data synth --out' or 'msam data real --out' wrote, or one with images/ + labels/"
    if not data_dir.is_dir():
        raise InvalidDataset(f"data folder {data_dir} does not exist: give {made_by}")
    manifest = data_dir / "dataset.json"
    if manifest.is_file():
        try:
            splits = json.loads(manifest.read_text())
            counts = {k: len(v) for k, v in splits.items() if isinstance(v, list) and v and isinstance(v[0], dict)
                      and "image" in v[0]}
        except (ValueError, AttributeError) as exc:
            raise InvalidDataset(f"{manifest} is not a readable MSD dataset.json ({exc})") from None
        if not counts.get(split):
            there = ", ".join(f"{k} ({n})" for k, n in counts.items()) or "none"
            raise InvalidDataset(f"{manifest} has no cases in split {split!r}; its splits (cases): {there}")
    elif (data_dir / "images").is_dir():
        if split != "training":
            raise InvalidDataset(f"{data_dir} is a plain images/ + labels/ folder, whose cases are all in the split "
                                 f"'training'; use that split, or an MSD folder (dataset.json) for {split!r}")
    else:
        raise InvalidDataset(f"{data_dir} holds neither dataset.json (MSD layout) nor images/ + labels/: give {made_by}")
    cases = list_cases(data_dir, split)
    if not cases:
        raise InvalidDataset(f"no image in {data_dir / 'images'} has a label of the same name in {data_dir / 'labels'}")
    missing = [c for c in cases if not (c.image.is_file() and c.label.is_file())]
    if missing:
        first = missing[0].image if not missing[0].image.is_file() else missing[0].label
        raise InvalidDataset(f"{len(missing)} of the {len(cases)} {split} cases in {data_dir} lack a file, e.g. {first}")
    return cases


def crop_centres(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3)`` voxel indices inside ``mask``, drawn with probability ~ depth in the mask."""
    depth, box = border_depth(mask, outside_is_background=False)  # the array's edge is not the lesion's
    inside = np.nonzero(depth > 0)  # C order in the box = C order in the volume
    idx = np.ravel_multi_index(tuple(i + b.start for i, b in zip(inside, box)), mask.shape)
    p = depth[inside]
    chosen = rng.choice(idx, size=count, replace=len(idx) < count, p=p / p.sum())
    return np.stack(np.unravel_index(chosen, mask.shape), 1)


def _case_crops(case: CaseRef, crops_per_lesion: int, seed: int, case_index: int, out: Path) -> list[dict]:
    """Write the crops of one case; its centres come from ``default_rng([seed, case_index])``, so
    the cache does not depend on how many workers build it."""
    # imported here, not at the top: the augmentation below runs where SimpleITK and nibabel do not
    from msam_core.io.load import load_volume
    from msam_core.pipeline.preprocess import CropGrid, VolumeSampler, mask_on_grid

    rng = np.random.default_rng([seed, case_index])
    volume = load_volume(case.image)
    labels = np.asarray(load_volume(case.label).array)
    sampler = VolumeSampler(volume)
    items = []
    for k in (int(v) for v in np.unique(labels) if v > 0):
        lesion = labels == k
        for c, centre in enumerate(crop_centres(lesion, crops_per_lesion, rng)):
            grid = CropGrid.centred(volume.voxel_to_ras(centre)[0])
            image = sampler.crop(grid)[0, 0].numpy().astype(np.float16)
            mask = mask_on_grid(lesion, volume, grid).astype(np.uint8)
            if not mask[64, 64, 64]:  # the first click must lie in the lesion
                continue
            stem = f"{case.name}_l{k}_c{c}"
            np.save(out / f"{stem}_img.npy", image)
            np.save(out / f"{stem}_msk.npy", mask)
            items.append({"stem": stem, "case": case.name, "lesion": k, "ct": bool(sampler.ct),
                          "centre_voxel": [int(v) for v in centre], "voxels": int(mask.sum())})
    return items


def build_cache(data_dir: Path, split: str = "training", crops_per_lesion: int = 2, seed: int = 0,
                cache_dir: Path | None = None, log_fn=print, workers: int = 1) -> Path:
    """Write (once) the crop cache of ``split``; returns its folder (``index.json`` + arrays).

    ``workers`` > 1 builds cases in that many processes; the result is the same.
    """
    out = Path(cache_dir) if cache_dir is not None else Path(data_dir) / "cache" / split
    index_path = out / "index.json"
    settings = {"version": CACHE_VERSION, "crops_per_lesion": crops_per_lesion, "seed": seed}
    if index_path.is_file() and json.loads(index_path.read_text()).get("settings") == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    cases = list_cases(data_dir, split)
    jobs = [(case, crops_per_lesion, seed, n, out) for n, case in enumerate(cases)]
    items: list[dict] = []
    if workers > 1 and len(cases) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(cases))) as pool:
            for n, case_items in enumerate(pool.map(_case_crops, *zip(*jobs))):
                items += case_items
                log_fn(f"cache {split}: {n + 1}/{len(cases)} cases, {len(items)} crops")
    else:
        for n, job in enumerate(jobs):
            items += _case_crops(*job)
            log_fn(f"cache {split}: {n + 1}/{len(cases)} cases, {len(items)} crops")
    index_path.write_text(json.dumps({"settings": settings, "items": items}, indent=1))
    return out


#: Thick-slice augmentation: slab thickness in crop voxels (3-6 mm at 1.5 mm) and the chance of each
#: crop axis being the slice axis (R, A, S: axial scans, the most common, are thick along S).
THICK_FACTORS = (2, 3, 4)
THICK_AXIS_P = (0.2, 0.2, 0.6)


def thicken(image: torch.Tensor, axis: int, factor: int, phase: int = 0) -> torch.Tensor:
    """``image [1, S, S, S]`` as a scan acquired in slabs ``factor`` voxels thick along crop axis
    ``axis`` (each slab the mean of its voxels, the first starting at voxel ``phase``) and resampled
    back onto the crop linearly, as :class:`~msam_core.pipeline.preprocess.VolumeSampler` resamples
    a thick-slice input: the through-plane blur of clinical CT and MR with 3-6 mm slices."""
    size = image.shape[axis + 1]
    if factor < 2 or not 0 <= phase < factor or size - phase < factor:
        raise ValueError(f"need 2 <= factor <= size - phase and 0 <= phase < factor, got {factor}, {phase}, size {size}")
    x = image.movedim(axis + 1, -1)
    n = (size - phase) // factor
    slabs = x[..., phase:phase + n * factor].reshape(*x.shape[:-1], n, factor).mean(-1)
    # voxel i lies at slab coordinate (i - phase - (factor - 1) / 2) / factor; clamp at the ends
    t = (torch.arange(size, device=image.device, dtype=image.dtype) - phase - (factor - 1) / 2) / factor
    t = t.clamp(0, n - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = t - lo.to(t.dtype)
    out = slabs[..., lo] * (1 - w) + slabs[..., hi] * w
    return out.movedim(-1, axis + 1).contiguous()


def augment(image: torch.Tensor, mask: torch.Tensor, click: torch.Tensor,
            rng: np.random.Generator, thick_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training augmentation of one crop (``[1, S, S, S]`` tensors on any device, click ``[3]``):
    a flip of each axis with p = 0.5 (the click follows), intensity scale 0.9-1.1 and shift
    +-0.1, and Gaussian noise (sd 0.02-0.1) with p = 0.3. With ``thick_p`` > 0, first, with that
    chance, :func:`thicken` along one axis (:data:`THICK_AXIS_P`) by a factor of
    :data:`THICK_FACTORS` (the mask stays the true shape). All draws come from ``rng``."""
    if thick_p > 0 and rng.random() < thick_p:
        factor = int(rng.choice(THICK_FACTORS))
        image = thicken(image, int(rng.choice(3, p=THICK_AXIS_P)), factor, int(rng.integers(factor)))
    axes = [a for a in range(3) if rng.random() < 0.5]
    if axes:
        image = torch.flip(image, [a + 1 for a in axes])
        mask = torch.flip(mask, [a + 1 for a in axes])
        click = click.clone()
        click[axes] = image.shape[1] - 1 - click[axes]
    image = image * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
    if rng.random() < 0.3:
        sd = float(rng.uniform(0.02, 0.1))
        noise = torch.Generator(image.device).manual_seed(int(rng.integers(2**62)))
        image = image + sd * torch.randn(image.shape, generator=noise, device=image.device, dtype=image.dtype)
    return image, mask, click


class CropDataset(torch.utils.data.Dataset):
    """Cached crops as ``(image [1,128,128,128] float32, mask [1,128,128,128] float32,
    first click [3] float32)``, with :func:`augment` when ``augment``.

    ``device=None`` reads each crop from disk (memory-mapped) when it is asked for; a device
    (a GPU) gets every crop copied onto it once (6 MB per crop: float16 image, uint8 mask), so
    training there never waits for the disk or the CPU. Both give the same crops.
    """

    def __init__(self, cache: Path, augment: bool = True, seed: int = 0, device: torch.device | str | None = None,
                 thick_p: float = 0.0) -> None:
        self.cache = Path(cache)
        self.thick_p = float(thick_p)
        self.items = json.loads((self.cache / "index.json").read_text())["items"]
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.device = torch.device(device) if device is not None else None
        self._images: torch.Tensor | None = None
        self._masks: torch.Tensor | None = None
        if self.device is not None and self.items:
            self._images = torch.empty(len(self.items), 1, 128, 128, 128, dtype=torch.float16, device=self.device)
            self._masks = torch.empty(len(self.items), 1, 128, 128, 128, dtype=torch.uint8, device=self.device)
            for i in range(len(self.items)):
                image, mask = self._read(i)
                self._images[i, 0] = torch.from_numpy(image).to(self.device)
                self._masks[i, 0] = torch.from_numpy(mask).to(self.device)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        stem = self.items[i]["stem"]
        return (np.load(self.cache / f"{stem}_img.npy", mmap_mode="r"),
                np.load(self.cache / f"{stem}_msk.npy", mmap_mode="r"))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._images is not None and self._masks is not None:
            image, mask = self._images[i].float(), self._masks[i].float()
        else:
            image_np, mask_np = self._read(i)
            image = torch.from_numpy(image_np.astype(np.float32))[None]
            mask = torch.from_numpy(mask_np.astype(np.float32))[None]
        click = torch.full((3,), 64.0, device=image.device)
        if self.augment:
            image, mask, click = augment(image, mask, click, np.random.default_rng([self.seed, self.epoch, i]),
                                         self.thick_p)
        return image, mask, click
