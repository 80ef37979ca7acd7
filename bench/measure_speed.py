"""Time of measuring one lesion the way a session does (``msam_core.measure.measure_box`` on the
box a session keeps), for ellipsoid lesions of three sizes on a 512 x 512 x 100 CT grid
(0.7 x 0.7 x 2.5 mm): what measuring adds to an interactive click.

    python bench/measure_speed.py

Prints one line per size: radius, voxel count, best of five runs in milliseconds.
"""

from __future__ import annotations

import time

import numpy as np

from msam_core.io.volume import Volume
from msam_core.measure import measure_box

SPACING = (0.7, 0.7, 2.5)


def main() -> None:
    affine = np.diag([*SPACING, 1.0])
    volume = Volume(np.random.default_rng(0).normal(40, 10, (512, 512, 100)).astype(np.float32), affine, modality="CT")
    for radius_mm in (5.0, 15.0, 30.0):
        half = [int(np.ceil(radius_mm / s)) + 1 for s in SPACING]
        grid = np.indices([2 * h + 1 for h in half]).astype(float)
        mask = sum(((grid[a] - half[a]) * SPACING[a] / radius_mm) ** 2 for a in range(3)) <= 1
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            measure_box(mask, (200, 200, 40), volume)
            runs.append(time.perf_counter() - t0)
        print(f"radius {radius_mm:4.0f} mm  {int(mask.sum()):7d} voxels  {min(runs) * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
