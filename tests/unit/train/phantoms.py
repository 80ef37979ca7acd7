"""Tiny synthetic source scans for the training tests (no downloads)."""

from __future__ import annotations

import numpy as np

from msam_train.sources import SPACING_MM, SourceScan


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float32)
    return sum((idx[a] - centre[a]) ** 2 for a in range(3)) <= radius**2


def phantom_scan(name: str = "phantom_ct", modality: str = "CT", shape: tuple[int, int, int] = (48, 44, 40),
                 seed: int = 0, heldout: bool = False) -> SourceScan:
    """A body (soft tissue) with two organs: "liver" (a big ball) and "kidney" (a small one)."""
    rng = np.random.default_rng(seed)
    body = _ball(shape, tuple(s / 2 for s in shape), min(shape) / 2 - 1)
    liver = _ball(shape, (shape[0] * 0.4, shape[1] / 2, shape[2] / 2), min(shape) * 0.25)
    kidney = _ball(shape, (shape[0] * 0.75, shape[1] / 2, shape[2] / 2), min(shape) * 0.12)
    if modality == "CT":
        image = np.full(shape, -1000.0, np.float32)
        image[body] = 20.0
        image[liver] = 60.0
        image[kidney] = 30.0
        image += rng.normal(0, 8, shape).astype(np.float32)
    else:
        image = np.zeros(shape, np.float32)
        image[body] = 300.0
        image[liver] = 500.0
        image[kidney] = 400.0
        image += rng.normal(0, 10, shape).astype(np.float32)
    affine = np.diag([SPACING_MM] * 3 + [1.0])
    affine[:3, 3] = (-30.0, -20.0, 10.0)
    return SourceScan(name, modality, image, affine, {"liver": liver, "kidney": kidney}, "totalsegmentator", heldout)


def phantom_scans() -> list[SourceScan]:
    return [phantom_scan("phantom_ct", "CT", seed=1), phantom_scan("phantom_mr", "MR", seed=2),
            phantom_scan("phantom_heldout", "CT", seed=3, heldout=True)]
