"""A finished job's lesions and their measurements, as the RIS outputs (FHIR, HL7) report them.

Each lesion is a dict: ``lesion`` (1-based number, the label value in the mask), ``label`` (the
name the request gave, or ``lesion N``) and ``measurements``, a dict of measurement name ->
value in the unit the name states:

- ``volume_ml``: the mask's voxel count times the voxel volume (the image's spacing, mm^3),
  in millilitres.
- ``long_axis_mm``, ``short_axis_mm``, ``max_diameter_3d_mm``: the lengths of the RECIST long
  and short axis and of the 3D diameter the job reports for the lesion (its ``measurements``);
  any other number the job reports there is passed on, and the writers map the names they know
  (:data:`msam_service.ris.fhir.CODES`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from msam_service.jobs import JobRecord
from msam_service.volumes import VolumeInfo


#: the job's measured lines (``lesions[].measurements``, :mod:`msam_core.measure`) -> their
#: length's name here
AXES = {"long_axis": "long_axis_mm", "short_axis": "short_axis_mm", "max_diameter_3d": "max_diameter_3d_mm"}


def voxel_volume_mm3(info: VolumeInfo) -> float:
    """The volume of one voxel: |det| of the affine's 3x3 part (spacing and any obliquity)."""
    return float(abs(np.linalg.det(np.asarray(info.affine_ras, dtype=float)[:3, :3])))


def lesion_measurements(rec: JobRecord, info: VolumeInfo | None) -> list[dict[str, Any]]:
    """The job's lesions with their measurements (``info``: the job's volume; without it there is
    no volume in millilitres)."""
    labels = {n + 1: str(lesion.get("label") or f"lesion {n + 1}")
              for n, lesion in enumerate((rec.request.prompts or {}).get("lesions") or [])}
    voxel = voxel_volume_mm3(info) if info is not None else None
    out = []
    for item in rec.lesions:
        n = int(item["lesion"])
        measured: dict[str, float] = {}
        if voxel is not None:
            measured["volume_ml"] = round(int(item.get("voxels", 0)) * voxel / 1000.0, 4)
        for name, value in (item.get("measurements") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                measured[name] = float(value)
            elif name in AXES and isinstance(value, dict) and isinstance(value.get("length_mm"), (int, float)):
                measured[AXES[name]] = float(value["length_mm"])
        out.append({"lesion": n, "label": labels.get(n, f"lesion {n}"), "measurements": measured})
    return out
