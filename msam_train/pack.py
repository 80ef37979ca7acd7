"""``msam data pack --out FILE``: everything online training needs, in one compressed file.

Training on a lent accelerator (``make gpu-model``, docs/gpu-training.md) cannot fetch anything
and carries at most 64 MiB with the repository, while the synthetic data set of ``msam data synth``
and its crop cache are gigabytes. What they are made of is small: a few real scans and organ masks
(:mod:`msam_train.sources`) and the lesion settings of :mod:`msam_train.synth`. A pack
holds exactly that, so :mod:`msam_train.online` can draw fresh lesions on the device at
every step, plus held-apart validation cases to choose and check checkpoints on:

- **anatomy**: every source scan on its 1.5 mm RAS grid (CT as int16 HU, rounded as ``msam data
  synth`` writes CT and clamped to the crops' window of -1000..1000 HU; MR as float32), its ``(4, 4)`` voxel -> RAS affine, its organ masks
  (bool), modality and whether it is held out (never drawn from in training);
- **lesion settings**: the per-organ diameter ranges (:data:`~msam_train.synth.SIZE_MM`);
- **validation**: the validation and held-out cases of ``msam data synth`` with the same seed and
  counts (the same cases, made by :func:`~msam_train.synth.make_case`), each stored as the
  box of the scan it changed (the change of intensity and the instance labels) and one crop centre per lesion,
  drawn as the crop cache of that split draws them (``build_cache(split, crops_per_lesion=1, seed=seed)``,
  :func:`~msam_train.data.crop_centres`): the crops are the ones that cache holds. A case is its
  scan with the box pasted in; a crop is 128^3 voxels of it centred on the centre voxel, zero
  outside the scan, normalised as inference normalises (:func:`normalise_crop`).

The file is a NumPy ``.npz`` (zip, LZMA): reading it needs numpy alone, no SimpleITK, nibabel
or MONAI. Its SHA-256 (:attr:`Pack.sha256`) is written into the provenance of every checkpoint
trained from it. Writing one needs the sources (fetched once with pip, :func:`fetch_sources`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msam_core.errors import InvalidDataset

PACK_VERSION = "msam-pack-v1"
CROP = 128
CT_CLAMP = (-1000.0, 1000.0)


@dataclass
class PackedScan:
    """One scan of a pack: ``image float32 [I, J, K]`` on the 1.5 mm RAS grid of ``affine``."""

    name: str
    modality: str
    image: np.ndarray
    affine: np.ndarray
    organs: dict[str, np.ndarray] = field(default_factory=dict)
    heldout: bool = False


@dataclass(frozen=True)
class ValidationCrop:
    """One lesion of a validation case: its crop centre (scan voxel) and where the case lies."""

    split: str
    case: str
    lesion: int
    scan: int
    centre: tuple[int, int, int]


@dataclass
class Pack:
    scans: list[PackedScan]
    size_mm: dict[str, tuple[float, float]]
    crops: list[ValidationCrop]
    patches: dict[str, tuple[int, tuple[int, int, int], np.ndarray, np.ndarray]]  # case -> (scan, lo, image, labels)
    meta: dict
    sha256: str
    path: Path

    @property
    def training_scans(self) -> list[PackedScan]:
        return [s for s in self.scans if not s.heldout]

    def case(self, name: str) -> tuple[PackedScan, np.ndarray, np.ndarray]:
        """``(scan, image, labels)`` of validation case ``name``: the scan with its box pasted in."""
        scan_index, lo, image_box, label_box = self.patches[name]
        scan = self.scans[scan_index]
        image = scan.image.copy()
        labels = np.zeros(image.shape, np.uint8)
        box = tuple(slice(a, a + n) for a, n in zip(lo, image_box.shape))
        image[box] = image_box
        labels[box] = label_box
        return scan, image, labels

    def validation(self, split: str = "validation", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[ValidationCrop]]:
        """The crops of ``split`` as ``(images float32 [N, 1, 128, 128, 128] normalised, masks
        float32 [N, 1, 128, 128, 128], crops)``; the first click of each is the crop centre."""
        import torch
        chosen = [c for c in self.crops if c.split == split][:limit]
        images, masks = [], []
        built: dict[str, tuple[PackedScan, np.ndarray, np.ndarray]] = {}
        for c in chosen:
            if c.case not in built:
                built = {c.case: self.case(c.case)}  # one case at a time in memory
            scan, image, labels = built[c.case]
            crop = torch.from_numpy(cut_crop(image, c.centre, 0.0))
            images.append(normalise_crop(crop, scan.modality == "CT")[None])
            masks.append(torch.from_numpy(cut_crop(labels == c.lesion, c.centre, False).astype(np.float32))[None])
        if not chosen:
            empty = torch.zeros(0, 1, CROP, CROP, CROP)
            return empty, empty.clone(), []
        return torch.stack(images), torch.stack(masks), chosen


def cut_crop(volume: np.ndarray, centre: tuple[int, int, int] | np.ndarray, fill, size: int = CROP) -> np.ndarray:
    """``size``^3 voxels of ``volume`` with voxel ``(size//2,)*3`` on voxel ``centre``, ``fill``
    outside: on a scan already on the 1.5 mm RAS grid this is the inference crop
    (:class:`~msam_core.pipeline.preprocess.CropGrid` centred on that voxel) without interpolation."""
    out = np.full((size,) * 3, fill, dtype=volume.dtype)
    lo = np.asarray(centre, int) - size // 2
    src = tuple(slice(max(a, 0), min(a + size, n)) for a, n in zip(lo, volume.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
    if all(s.stop > s.start for s in src):
        out[dst] = volume[src]
    return out


def normalise_crop(crop: torch.Tensor, ct: bool) -> torch.Tensor:
    """:func:`msam_core.pipeline.preprocess.normalize_crop` in torch, on the crop's device: CT
    clamped to [-1000, 1000] HU, then z-scored with the mean and standard deviation of the voxels
    > 0 (all voxels when fewer than two are > 0; a constant crop becomes zeros)."""
    out = crop.float()
    if ct:
        out = out.clamp(*CT_CLAMP)
    positive = out > 0
    values = out[positive] if int(positive.sum()) >= 2 else out.reshape(-1)
    values = values.double()
    mean, std = values.mean(), values.std(correction=0)
    out = out - mean.float()
    if float(std) > 0:
        out = out / std.float()
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stored(image: np.ndarray, modality: str) -> np.ndarray:
    """How a pack stores an image: CT as int16 HU rounded (as ``msam data synth`` writes it) and
    clamped to the crops' CT window (every crop is clamped to it before anything else, so the
    crops do not change, and the noise of air and bone no longer fills the file); MR as float32."""
    if modality == "CT":
        return np.clip(np.round(image), *CT_CLAMP).astype(np.int16)
    return np.asarray(image, np.float32)


def write_pack(out: Path, seed: int = 0, n_train: int = 90, n_val: int = 12, n_heldout: int = 12,
               scans: list | None = None, log=print) -> dict:
    """Write the pack (see the module's docstring) and return its metadata. ``scans`` are
    :class:`~msam_train.sources.SourceScan` (default: the fetched sources); the validation
    cases are those ``msam data synth --seed seed --train n_train --val n_val --heldout n_heldout``
    writes (case indices ``n_train..``)."""
    from msam_train.data import crop_centres
    from msam_train.synth import SIZE_MM, make_case

    if scans is None:
        from msam_train.sources import fetch_sources, load_sources

        scans = load_sources(fetch_sources())
    arrays: dict[str, np.ndarray] = {}
    scan_meta = []
    for i, s in enumerate(scans):
        arrays[f"scan{i}_image"] = _stored(s.image, s.modality)
        for organ, mask in sorted(s.organs.items()):
            arrays[f"scan{i}_organ_{organ}"] = np.asarray(mask, bool)
        scan_meta.append({"name": s.name, "modality": s.modality, "affine": np.asarray(s.affine).tolist(),
                          "organs": sorted(s.organs), "heldout": bool(s.heldout), "shape": list(s.image.shape)})
    train_idx = [i for i, s in enumerate(scans) if not s.heldout]
    held_idx = [i for i, s in enumerate(scans) if s.heldout]
    crops, cases = [], []
    index = n_train  # msam data synth numbers training cases first
    for split, pool, count in (("validation", train_idx, n_val), ("heldout", held_idx, n_heldout)):
        for i in range(count if pool else 0):
            scan_index = pool[i % len(pool)]
            scan = scans[scan_index]
            case = make_case(scan, seed, index)
            index += 1
            if not case.lesions:  # msam data synth writes no such case
                continue
            position = sum(1 for c in cases if c["split"] == split)  # the case's place in its split
            stored = _stored(case.image, scan.modality)
            base = arrays[f"scan{scan_index}_image"]
            changed = (stored != base) | (case.labels > 0)
            where = np.argwhere(changed)
            lo, hi = where.min(0), where.max(0) + 1
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            k = len(cases)
            arrays[f"case{k}_delta"] = stored[box] - base[box]  # zero but where the lesions are: small once compressed
            arrays[f"case{k}_labels"] = case.labels[box]
            cases.append({"name": case.name, "split": split, "scan": scan_index, "lo": [int(v) for v in lo]})
            rng = np.random.default_rng([seed, position])  # as build_cache(split, seed=seed) draws
            for info in case.lesions:
                centre = crop_centres(case.labels == info.label, 1, rng)[0]
                crops.append({"split": split, "case": case.name, "lesion": info.label, "scan": scan_index,
                              "centre": [int(v) for v in centre]})
            log(f"{split} {case.name}: {len(case.lesions)} lesion(s)")
    meta = {"version": PACK_VERSION, "seed": seed, "counts": {"train": n_train, "val": n_val, "heldout": n_heldout},
            "spacing_mm": 1.5, "axes": "RAS, voxel order i, j, k along the affine's columns",
            "size_mm": {k: list(v) for k, v in SIZE_MM.items()}, "scans": scan_meta, "cases": cases, "crops": crops}
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zf:  # np.load reads LZMA members too
        for name, array in arrays.items():
            member = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))  # no clock: same input, same bytes
            member.compress_type = zipfile.ZIP_LZMA
            with zf.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    tmp.replace(out)
    return meta


def read_meta(path: Path) -> dict:
    """The metadata of a pack, read without its arrays (a quick check before slow work).

    Raises:
        InvalidDataset: the file is missing, not a pack, or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidDataset(f"pack {path} does not exist: write it with 'msam data pack --out {path}'")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta_json"].tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InvalidDataset(f"{path} is not a pack written by 'msam data pack' ({exc})") from None
    if not isinstance(meta, dict) or meta.get("version") != PACK_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise InvalidDataset(f"{path} is a pack of version {version!r}; this msam reads {PACK_VERSION!r}: "
                             "write it again with 'msam data pack'")
    return meta


def load_pack(path: Path) -> Pack:
    """Read a pack written by :func:`write_pack` (numpy only).

    Raises:
        InvalidDataset: the file is missing, not a pack, or of another version.
    """
    path = Path(path)
    meta = read_meta(path)
    z = np.load(path, allow_pickle=False)
    scans = []
    for i, m in enumerate(meta["scans"]):
        scans.append(PackedScan(m["name"], m["modality"], z[f"scan{i}_image"].astype(np.float32), np.asarray(m["affine"]),
                                {o: z[f"scan{i}_organ_{o}"] for o in m["organs"]}, m["heldout"]))
    patches = {}
    for k, c in enumerate(meta["cases"]):
        delta = z[f"case{k}_delta"]
        box = tuple(slice(a, a + n) for a, n in zip(c["lo"], delta.shape))
        image = (z[f"scan{c['scan']}_image"][box] + delta).astype(np.float32)
        patches[c["name"]] = (c["scan"], tuple(c["lo"]), image, z[f"case{k}_labels"])
    crops = [ValidationCrop(c["split"], c["case"], c["lesion"], c["scan"], tuple(c["centre"])) for c in meta["crops"]]
    size_mm = {k: (float(v[0]), float(v[1])) for k, v in meta["size_mm"].items()}
    return Pack(scans, size_mm, crops, patches, meta, file_sha256(path), path)


def add_parser(data_sub: argparse._SubParsersAction) -> None:
    from msam_core.cli.arguments import whole_number

    p = data_sub.add_parser("pack", help="pack the anatomy and validation cases for online training (one .npz)",
                            description="Write one compressed file with the source scans on the 1.5 mm RAS grid, "
                            "their organ masks, the per-organ lesion settings and the validation and held-out "
                            "cases of 'msam data synth' with the same seed and counts: what 'msam train --pack' "
                            "needs to synthesise lesions on the training device. See docs/gpu-training.md.")
    p.add_argument("--out", type=Path, required=True, help="file to write (.npz)")
    p.add_argument("--seed", type=whole_number(0), default=0, help="seed of the validation cases (as msam data synth)")
    p.add_argument("--train", type=whole_number(1), default=90, help="training cases of the matching synth set "
                   "(only numbers the validation cases)")
    p.add_argument("--val", type=whole_number(1), default=12, help="validation cases (training sources)")
    p.add_argument("--heldout", type=whole_number(1), default=12, help="cases from the held-out source scan")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    meta = write_pack(args.out, args.seed, args.train, args.val, args.heldout)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(meta['scans'])} scans, {len(meta['cases'])} validation cases, "
          f"{len(meta['crops'])} crops, {size / 2**20:.1f} MiB, sha256 {file_sha256(Path(args.out))}")
    return 0
