"""Measurement error on the analytic ellipsoid phantoms of tests/unit/test_measure.py: for each
phantom (anisotropic, oblique, rotated, flipped grids), the measured volume, RECIST long and
short axes, 3D diameter and surface area against the ellipsoid's own, and the voxel diagonal
(the tolerance the tests allow for diameters). Then lesions that few slices cut (an ellipsoid of
30 x 20 x 16 mm and balls, on slices of 1 to 5 mm): the surface area and sphericity, which
SimpleITK's estimate gets least right there.

    .venv/bin/python -m bench.measure_phantoms
"""

from __future__ import annotations

import numpy as np

from msam_core.io.volume import Volume
from msam_core.measure import acquisition_axis, measure_lesion
from tests.unit.test_measure import CASES, centre_of, ellipsoid, grid, section_axes


def main() -> None:
    print(f"{'phantom':30s} {'diag':>5s} {'vol %':>6s} {'long mm':>8s} {'short mm':>8s} {'3D mm':>7s} {'area %':>7s}")
    worst = np.zeros(5)
    for name, (shape, spacing, directions, orientation, semi) in CASES.items():
        affine = grid(spacing, directions, origin=(-30.0, 12.0, -40.0))
        mask = ellipsoid(shape, affine, centre_of(shape, affine), semi, orientation)
        volume = Volume(mask.astype(np.int16), affine, modality="CT")
        m = measure_lesion(mask, volume)
        plane = [a for a in range(3) if a != acquisition_axis(volume)]
        long_true, short_true = section_axes(semi, orientation, directions[:, plane])
        a, b, c = semi
        p = 1.6075
        area_true = 4 * np.pi * ((a ** p * b ** p + a ** p * c ** p + b ** p * c ** p) / 3) ** (1 / p)
        errors = np.array([
            100 * (m.volume_ml / (4 / 3 * np.pi * a * b * c / 1000) - 1),
            m.long_axis.length_mm - long_true,
            m.short_axis.length_mm - short_true,
            m.max_diameter_3d.length_mm - 2 * max(semi),
            100 * (m.surface_area_mm2 / area_true - 1),
        ])
        worst = np.maximum(worst, np.abs(errors))
        print(f"{name:30s} {np.linalg.norm(spacing):5.2f} " + " ".join(f"{e:+7.2f}" for e in errors))
    print(f"{'largest |error|':30s} {'':5s} " + " ".join(f"{e:7.2f}" for e in worst))
    print(f"\n{'few slices: semi-axes mm':26s} {'spacing mm':>16s} {'slices':>6s} {'area %':>7s} "
          f"{'sphericity':>10s} {'true':>5s}")
    for semi, spacing in (((15.0, 10.0, 8.0), (0.7, 0.7, 1.0)), ((15.0, 10.0, 8.0), (0.8, 0.8, 2.0)),
                          ((15.0, 10.0, 8.0), (0.7, 0.9, 2.5)), ((12.0, 12.0, 12.0), (0.8, 0.8, 2.5)),
                          ((12.0, 12.0, 12.0), (0.8, 0.8, 5.0)), ((5.0, 5.0, 5.0), (0.8, 0.8, 5.0))):
        shape = tuple(int(2 * s / d) + 8 for s, d in zip(semi, spacing))
        affine = grid(spacing, np.eye(3), origin=(-30.0, 12.0, -40.0))
        mask = ellipsoid(shape, affine, centre_of(shape, affine) + 0.3, semi)
        m = measure_lesion(mask, Volume(mask.astype(np.int16), affine, modality="CT"))
        a, b, c = semi
        p = 1.6075
        area_true = 4 * np.pi * ((a ** p * b ** p + a ** p * c ** p + b ** p * c ** p) / 3) ** (1 / p)
        sphericity = np.pi ** (1 / 3) * (6 * 4 / 3 * np.pi * a * b * c) ** (2 / 3) / area_true
        print(f"{str(semi):26s} {str(spacing):>16s} {2 * c / spacing[2]:6.1f} "
              f"{100 * (m.surface_area_mm2 / area_true - 1):+7.2f} {m.sphericity:10.3f} {sphericity:5.3f}")


if __name__ == "__main__":
    main()
