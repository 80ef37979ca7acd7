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
from scipy import ndimage

from msam_core.io.load import load_volume
from msam_core.pipeline.preprocess import CropGrid, VolumeSampler, mask_on_grid

log = logging.getLogger(__name__)

CACHE_VERSION = "msam-crops-v1"


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


def crop_centres(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3)`` voxel indices inside ``mask``, drawn with probability ~ depth in the mask."""
    depth = ndimage.distance_transform_edt(mask)
    idx = np.flatnonzero(depth > 0)
    p = depth.ravel()[idx]
    chosen = rng.choice(idx, size=count, replace=len(idx) < count, p=p / p.sum())
    return np.stack(np.unravel_index(chosen, mask.shape), 1)


def build_cache(data_dir: Path, split: str = "training", crops_per_lesion: int = 2, seed: int = 0,
                cache_dir: Path | None = None, log_fn=print) -> Path:
    """Write (once) the crop cache of ``split``; returns its folder (``index.json`` + arrays)."""
    out = Path(cache_dir) if cache_dir is not None else Path(data_dir) / "cache" / split
    index_path = out / "index.json"
    settings = {"version": CACHE_VERSION, "crops_per_lesion": crops_per_lesion, "seed": seed}
    if index_path.is_file() and json.loads(index_path.read_text()).get("settings") == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    cases = list_cases(data_dir, split)
    for n, case in enumerate(cases):
        volume = load_volume(case.image)
        labels = np.asarray(load_volume(case.label).array)
        sampler = VolumeSampler(volume)
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
                              "centre_voxel": [int(v) for v in centre],
                              "voxels": int(mask.sum())})
        log_fn(f"cache {split}: {n + 1}/{len(cases)} cases, {len(items)} crops")
    index_path.write_text(json.dumps({"settings": settings, "items": items}, indent=1))
    return out


class CropDataset(torch.utils.data.Dataset):
    """Cached crops as ``(image [1,128,128,128] float32, mask [1,128,128,128] float32,
    first click [3] float32)``, with flips and intensity augmentation when ``augment``."""

    def __init__(self, cache: Path, augment: bool = True, seed: int = 0) -> None:
        self.cache = Path(cache)
        self.items = json.loads((self.cache / "index.json").read_text())["items"]
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stem = self.items[i]["stem"]
        image = np.load(self.cache / f"{stem}_img.npy", mmap_mode="r").astype(np.float32)
        mask = np.load(self.cache / f"{stem}_msk.npy", mmap_mode="r").astype(np.float32)
        click = np.full(3, 64.0, np.float32)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            for axis in range(3):
                if rng.random() < 0.5:
                    image = np.flip(image, axis)
                    mask = np.flip(mask, axis)
                    click[axis] = image.shape[axis] - 1 - click[axis]
            image = image * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.uniform(-0.1, 0.1))
            if rng.random() < 0.3:
                image = image + rng.normal(0, rng.uniform(0.02, 0.1), image.shape).astype(np.float32)
        img_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        msk_t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        return img_t, msk_t, torch.from_numpy(click)
