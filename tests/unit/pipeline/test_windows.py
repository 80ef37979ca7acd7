"""The logit canvas that merges a lesion's windows (msam_core.pipeline.windows)."""

from __future__ import annotations

import numpy as np

from msam_core.pipeline.postprocess import BACKGROUND_LOGIT
from msam_core.pipeline.preprocess import CropGrid
from msam_core.pipeline.windows import STEP, WINDOW_WEIGHT, LogitCanvas


def _by_hand(windows: dict[tuple[int, int, int], np.ndarray]) -> np.ndarray:
    """The weighted mean of the windows on the canvas's lattice, every sum starting at 0 and
    every voxel no window covers the background: what the canvas must give, value for value."""
    lo = np.min(list(windows), axis=0)
    hi = np.max(list(windows), axis=0) + 2  # a window spans two blocks per axis
    total = np.zeros(tuple((hi - lo) * STEP), np.float32)
    weight = np.zeros_like(total)
    for offset, logits in windows.items():
        sl = tuple(slice(int(o - a) * STEP, int(o - a + 2) * STEP) for o, a in zip(offset, lo))
        total[sl] += logits * WINDOW_WEIGHT
        weight[sl] += WINDOW_WEIGHT
    out = np.full(total.shape, BACKGROUND_LOGIT, np.float32)
    np.divide(total, weight, out=out, where=weight > 0)
    return out


def test_merged_windows_are_their_weighted_mean_with_background_where_none_reaches():
    """One window (its blocks fill the box), two overlapping along an axis, and three that leave
    blocks of the box uncovered; logits with +-0, large and small values."""
    rng = np.random.default_rng(0)
    base = CropGrid.centred(np.zeros(3), size=128)
    for offsets in ([(0, 0, 0)], [(0, 0, 0), (1, 0, 0)], [(0, 0, 0), (1, 0, 0), (0, 1, 1)]):
        windows = {}
        canvas = LogitCanvas(base=base)
        for offset in offsets:
            logits = rng.normal(0, 8, (128, 128, 128)).astype(np.float32)
            logits[:3, :3, :3] = 0.0
            logits[3:5, :3, :3] = -0.0
            windows[offset] = logits
            canvas.add(offset, logits)
        merged, _ = canvas.merged()
        expected = _by_hand(windows)
        assert merged.shape == expected.shape
        np.testing.assert_array_equal(merged, expected)
        assert (merged == BACKGROUND_LOGIT).any() == (len(offsets) == 3)
