"""Pre- and post-processing time of the inference pipeline for a 512 x 512 x 300 CT.

Target: < 1 s together on a CPU, so that the image encoder dominates a request.

    python bench/pipeline.py [--repeats 5] [--order F|C]

Pre-processing: wrap the volume for SimpleITK, detect CT, sample the 128^3 1.5 mm RAS crop
(reorient + resample + crop in one trilinear pass), clamp + z-score, hash for the cache key.
Post-processing: 32^3 logits -> 128^3 trilinear, merge into the lesion canvas, nearest
resampling of the logits back onto the 512 x 512 x 300 grid (foreground box only), label mask.
The network is not run: the logits are those of a 30 mm sphere. Also the stable-region prior
(``msam_core.pipeline.region_prior``) of a click on the volume's 15 mm-radius lesion, and of a
click on the uniform tissue beside it, whose regions leak into the whole body (the worst case); and the
full-resolution boundary refinement (``msam_core.pipeline.boundary``, a random walker in a band of
2 voxels) of the 30 mm sphere's mask. And the coarse view's own work per click
(``msam_core.pipeline.coarse_view``, models calibrated with it): cutting the 3 mm crop (once per
window), resampling its logits onto the 1.5 mm crop and choosing between two masks by contrast;
its encoder and decoder passes are the network's and are not run here.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msam_core.io.volume import Volume  # noqa: E402
from msam_core.pipeline.postprocess import combine_lesions, logits_to_volume_grid, upsample_logits  # noqa: E402
from msam_core.pipeline.preprocess import CropGrid, VolumeSampler  # noqa: E402
from msam_core.pipeline.boundary import refine_boundary  # noqa: E402
from msam_core.pipeline.coarse_view import choose, coarse_grid, logits_to_fine  # noqa: E402
from msam_core.pipeline.region_prior import RegionPrior  # noqa: E402
from msam_core.pipeline.segmenter import crop_key  # noqa: E402
from msam_core.pipeline.windows import LogitCanvas  # noqa: E402

SHAPE = (512, 512, 300)
SPACING = (0.7, 0.7, 1.5)
LESION = (300.0, 240.0, 150.0)


def ct_volume(order: str) -> Volume:
    """A CT-like int16 volume: air, a body ellipse of soft tissue with noise, a lesion."""
    rng = np.random.default_rng(0)
    i, j = np.ogrid[:SHAPE[0], :SHAPE[1]]
    body = ((i - 256) / 220.0) ** 2 + ((j - 256) / 170.0) ** 2 < 1
    slab = np.where(body, 40, -1000).astype(np.int16)
    array = np.empty(SHAPE, np.int16, order=order)
    for k in range(SHAPE[2]):
        array[:, :, k] = slab
    array += rng.integers(-20, 20, size=SHAPE, dtype=np.int16)
    # a 15 mm-radius lesion 60 HU above the tissue around LESION (the crop centre)
    lo = [int(c - 16 / s) for c, s in zip(LESION, SPACING)]
    block = np.indices([int(2 * 16 / s) + 1 for s in SPACING], dtype=np.float32)
    d = np.sqrt(sum(((block[i] + lo[i] - LESION[i]) * SPACING[i]) ** 2 for i in range(3)))
    sub = array[lo[0]:lo[0] + d.shape[0], lo[1]:lo[1] + d.shape[1], lo[2]:lo[2] + d.shape[2]]
    sub += np.where(d <= 15.0, 60, 0).astype(np.int16)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -np.asarray(SHAPE) * SPACING / 2
    return Volume(array, affine, modality=None)


def sphere_logits(radius_crop_voxels: float = 20.0) -> torch.Tensor:
    """``[1, 1, 32, 32, 32]`` logits of a sphere at the crop centre (30 mm radius)."""
    g = (np.indices((32, 32, 32)) + 0.5) * 4 - 64
    d = np.sqrt((g ** 2).sum(axis=0))
    return torch.from_numpy(((radius_crop_voxels - d) / 2).astype(np.float32))[None, None]


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--order", choices=["F", "C"], default="F",
                        help="memory order of the input array (nibabel/pynrrd give F)")
    args = parser.parse_args()
    volume = ct_volume(args.order)
    centre_ras = volume.voxel_to_ras(list(LESION))[0]
    grid = CropGrid.centred(centre_ras)
    low_res = sphere_logits()

    t_wrap, sampler = timed(lambda: VolumeSampler(volume), args.repeats)
    t_crop, image = timed(lambda: sampler.crop(grid), args.repeats)
    t_key, _ = timed(lambda: crop_key("bench", image), args.repeats)

    def post() -> np.ndarray:
        canvas = LogitCanvas(base=grid)
        canvas.add((0, 0, 0), upsample_logits(low_res))
        logits, affine = canvas.merged()
        return combine_lesions({1: logits_to_volume_grid(logits, affine, volume)}, volume.shape)

    t_post, labels = timed(post, args.repeats)
    t_smooth, prior = timed(lambda: RegionPrior(image.numpy()), args.repeats)
    t_region, region = timed(lambda: RegionPrior(image.numpy()).region((64.0, 64.0, 64.0)), args.repeats)
    t_leak, leak = timed(lambda: RegionPrior(image.numpy()).region((20.0, 64.0, 64.0)), args.repeats)
    sphere = upsample_logits(low_res)
    click = np.array([[64.0, 64.0, 64.0]])
    t_band, refined = timed(lambda: refine_boundary(image.numpy(), sphere, click, np.array([1]), band=2), args.repeats)
    coarse = coarse_grid(grid)
    t_ccrop, _ = timed(lambda: sampler.crop(coarse), args.repeats)
    t_map, seen = timed(lambda: logits_to_fine(sphere, grid, coarse), args.repeats)
    t_choose, _ = timed(lambda: choose(image.numpy(), {"fine": sphere, "both": (sphere + seen) / 2}), args.repeats)
    pre = t_wrap + t_crop + t_key
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"volume {SHAPE} int16, spacing {SPACING} mm, {args.order}-ordered; best of {args.repeats}")
    print(f"  pre : wrap+CT check {t_wrap * 1e3:7.1f} ms | crop+normalise {t_crop * 1e3:7.1f} ms | "
          f"cache key {t_key * 1e3:6.1f} ms | total {pre * 1e3:7.1f} ms")
    print(f"  post: upsample+merge+to input grid+labels {t_post * 1e3:7.1f} ms "
          f"({int(labels.sum())} lesion voxels)")
    print(f"  stable-region prior (models calibrated with one): smooth the crop {t_smooth * 1e3:7.1f} ms | "
          f"one click's region {(t_region - t_smooth) * 1e3:7.1f} ms "
          f"({0 if region is None else int(region.sum())} voxels; a 15 mm-radius sphere holds ~4190) | "
          f"a click that leaks {(t_leak - t_smooth) * 1e3:7.1f} ms ({'no' if leak is None else int(leak.sum())} region)")
    print(f"  boundary refinement (models calibrated with one), band 2: {t_band * 1e3:7.1f} ms "
          f"({int((sphere > 0).sum())} -> {int((refined > 0).sum())} voxels)")
    print(f"  coarse view (models calibrated with it): 3 mm crop {t_ccrop * 1e3:7.1f} ms per window | "
          f"logits onto the 1.5 mm crop {t_map * 1e3:7.1f} ms + choice of two masks {t_choose * 1e3:7.1f} ms per click")
    total = pre + t_post
    print(f"  pre + post {total * 1e3:.1f} ms  (target < 1000 ms: {'met' if total < 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
