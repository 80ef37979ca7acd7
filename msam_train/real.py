"""Real tumours for evaluation: the clinical test cases that PyRadiomics ships.

PyRadiomics 3.1.0's source distribution on PyPI (BSD-3-Clause, Copyright 2017 Harvard Medical
School) carries five de-identified scans, each with one tumour outlined
(``data/<case>_image.nrrd`` + ``data/<case>_label.nrrd``, same grid):

======== ======== ======= ============================== ================
case     modality organ   grid (spacing, mm)             tumour (eq. diam.)
======== ======== ======= ============================== ================
brain1   MR       brain   256 x 256 x 25 (0.78, 6.5)     31 mm
brain2   MR       brain   256 x 256 x 23 (0.78, 6.5)     15 mm
breast1  MR       breast  45 x 120 x 21 (0.66, 2.1)      6 mm
lung1    CT       lung    512 x 512 x 48 (0.57, 5.0)     14 mm
lung2    CT       lung    512 x 512 x 61 (0.63, 5.0)     45 mm
======== ======== ======= ============================== ================

``msam data real --out DIR`` fetches the sdist with pip (once; SHA-256 checked; cached beside
the synthetic-lesion sources, never committed), copies the NRRD pairs unchanged - their own
geometry (LPS ``space directions``, thick anisotropic slices, flipped axes) is what the loader
must get right - and writes an MSD ``dataset.json`` whose one split, ``real``, lists them with
modality, organ and the tumour's equivalent diameter. ``msam evaluate --data DIR --split real``
then measures a model on real tumours. Nothing here is used for training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from msam_core.io.load import load_volume
from msam_train.sources import cache_dir, download

PYRADIOMICS = ("pyradiomics @ https://files.pythonhosted.org/packages/03/c1/"
               "20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/pyradiomics-3.1.0.tar.gz",
               "pyradiomics-3.1.0.tar.gz", "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4")
MEMBER_DIR = "pyradiomics-3.1.0/data/"

#: case -> (modality, organ)
CASES: dict[str, tuple[str, str]] = {
    "brain1": ("MR", "brain"), "brain2": ("MR", "brain"), "breast1": ("MR", "breast"),
    "lung1": ("CT", "lung"), "lung2": ("CT", "lung"),
}
LICENCE = ("PyRadiomics 3.1.0 sdist, BSD-3-Clause, Copyright 2017 Harvard Medical School: the test cases of "
           "its data/ folder (de-identified clinical scans; the package does not state their origin). Used for "
           "evaluation only, never redistributed by msam")


def extract_cases(archive: Path, out: Path, cases: dict[str, tuple[str, str]] = CASES) -> Path:
    """Copy ``<case>_image.nrrd`` and ``<case>_label.nrrd`` of every case out of the sdist."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for case in cases:
            for kind in ("image", "label"):
                member = f"{MEMBER_DIR}{case}_{kind}.nrrd"
                try:
                    data = tar.extractfile(member)
                except KeyError:
                    data = None
                if data is None:
                    raise ValueError(f"{archive.name} has no {member}")
                (out / f"{case}_{kind}.nrrd").write_bytes(data.read())
    return out


def fetch_cases(root: Path | None = None) -> Path:
    """Download (once) and extract the PyRadiomics cases; returns the folder holding the NRRDs."""
    root = Path(root) if root is not None else cache_dir()
    out = root / "files" / "pyradiomics"
    if all((out / f"{c}_{k}.nrrd").is_file() for c in CASES for k in ("image", "label")):
        return out
    # a URL requirement: the sdist's own metadata says 3.0.1a1, which pip refuses for "==3.1.0"
    return extract_cases(download(*PYRADIOMICS, root), out)


def lesion_facts(label_path: Path, organ: str) -> list[dict]:
    """``[{label, organ, diameter_mm, voxels}]`` for every lesion value ``k > 0`` of a label map."""
    label = load_volume(label_path)
    values = np.asarray(label.array)
    voxel_mm3 = float(abs(np.linalg.det(label.affine[:3, :3])))
    facts = []
    for k in (int(v) for v in np.unique(values) if v > 0):
        voxels = int((values == k).sum())
        diameter = (6 * voxels * voxel_mm3 / np.pi) ** (1 / 3)
        facts.append({"label": k, "organ": organ, "diameter_mm": round(float(diameter), 2), "voxels": voxels})
    return facts


def write_dataset(files: Path, out: Path, cases: dict[str, tuple[str, str]] = CASES) -> dict:
    """The MSD data set of the real cases (split ``real``); returns ``dataset.json``'s content."""
    for folder in ("imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    entries = []
    for case, (modality, organ) in cases.items():
        shutil.copyfile(files / f"{case}_image.nrrd", out / "imagesTs" / f"{case}.nrrd")
        shutil.copyfile(files / f"{case}_label.nrrd", out / "labelsTs" / f"{case}.nrrd")
        entries.append({"image": f"./imagesTs/{case}.nrrd", "label": f"./labelsTs/{case}.nrrd",
                        "source": "pyradiomics", "modality": modality,
                        "lesions": lesion_facts(out / "labelsTs" / f"{case}.nrrd", organ)})
    dataset = {
        "name": "msam-real-tumours",
        "description": "Real tumours (PyRadiomics test cases) for evaluation only (msam data real)",
        "reference": "msam_train.real",
        "licence": LICENCE,
        "tensorImageSize": "3D",
        "modality": {"0": "CT or MR (see each case)"},
        "labels": {"0": "background", "1": "tumour"},
        "numTraining": 0,
        "training": [],
        "real": entries,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return dataset


def add_parser(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser("real", help="real tumours for evaluation (PyRadiomics test cases, MSD layout)",
                            description="Fetch PyRadiomics 3.1.0's sdist with pip (cached, never committed) and "
                            "write its five clinical tumour cases (brain MR x2, breast MR, lung CT x2) as an MSD "
                            "data set with the split 'real', for msam evaluate --split real.")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dataset = write_dataset(fetch_cases(), args.out)
    lesions = sum(len(e["lesions"]) for e in dataset["real"])
    print(f"wrote {args.out} ({len(dataset['real'])} cases, {lesions} tumours; split 'real')")
    return 0
