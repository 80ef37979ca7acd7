"""From an input :class:`~msam_core.io.volume.Volume` to the network's 128^3 input.

Upstream SAM-Med3D reorients to RAS (``tio.ToCanonical``), resamples to 1.5 mm isotropic, crops or
pads 128^3 around the target, and z-scores the crop over its voxels > 0. We do the first three in
**one** interpolation: the crop is a :class:`CropGrid`, 128^3 voxels of 1.5 mm whose axes run
along R, A, S, centred on the prompt, and the input is sampled (trilinear; nearest for masks)
straight onto it. That is the same arithmetic as reorient -> resample -> crop, one interpolation
instead of two, and it touches 2 M voxels instead of the whole volume. Voxels of the crop outside
the image are 0, as upstream's padding.

One deliberate difference: the crop axes are the *world* R, A, S axes, also for oblique images
(upstream keeps the obliquity). So the same anatomy gives the same crop however it was stored.

Array axis order of a crop, and of the network's tensors ``[B, 1, D, H, W]``: ``[a, b, c]`` with
``a`` along +R, ``b`` along +A, ``c`` along +S. Click coordinates passed to the network are
continuous crop voxel indices in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from msam_core.io.volume import Volume
from msam_core.pipeline.resample import IndexImage, Interpolation

CROP_SIZE = 128
SPACING_MM = 1.5
CT_CLAMP = (-1000.0, 1000.0)
#: Below this, a CT value in HU is air (fat, the lowest tissue, lies far above it).
CT_MIN_HU = -500.0


@dataclass(frozen=True)
class CropGrid:
    """A 128^3 grid, 1.5 mm isotropic, axes along +R, +A, +S.

    Attributes:
        origin_ras: ``(3,)`` RAS mm of crop voxel ``(0, 0, 0)`` (its centre).
        size: voxels per side.
        spacing: mm per voxel.
    """

    origin_ras: tuple[float, float, float]
    size: int = CROP_SIZE
    spacing: float = SPACING_MM

    @classmethod
    def centred(cls, center_ras: np.ndarray, size: int = CROP_SIZE,
                spacing: float = SPACING_MM) -> "CropGrid":
        """The grid whose voxel ``(size/2, size/2, size/2)`` sits exactly on ``center_ras``."""
        origin = np.asarray(center_ras, dtype=np.float64) - (size // 2) * spacing
        return cls(origin_ras=tuple(float(v) for v in origin), size=size, spacing=spacing)

    def shifted(self, steps_voxel: tuple[int, int, int]) -> "CropGrid":
        """The same lattice moved by whole crop voxels along R, A, S."""
        origin = np.asarray(self.origin_ras) + np.asarray(steps_voxel) * self.spacing
        return CropGrid(origin_ras=tuple(float(v) for v in origin), size=self.size,
                        spacing=self.spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.size)

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` crop voxel index ``(a, b, c)`` -> RAS mm."""
        affine = np.diag([self.spacing] * 3 + [1.0])
        affine[:3, 3] = self.origin_ras
        return affine

    def ras_to_crop(self, points_ras: np.ndarray) -> np.ndarray:
        """``(N, 3)`` RAS mm -> ``(N, 3)`` continuous crop voxel indices."""
        pts = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
        return (pts - np.asarray(self.origin_ras)) / self.spacing

    def crop_to_ras(self, points_crop: np.ndarray) -> np.ndarray:
        """``(N, 3)`` crop voxel indices -> ``(N, 3)`` RAS mm."""
        pts = np.asarray(points_crop, dtype=np.float64).reshape(-1, 3)
        return pts * self.spacing + np.asarray(self.origin_ras)

    def contains_crop(self, points_crop: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: crop voxel positions inside the grid's extent."""
        pts = np.asarray(points_crop, dtype=np.float64).reshape(-1, 3)
        return np.all((pts >= -0.5) & (pts <= self.size - 0.5), axis=1)


#: Share of voxels below :data:`CT_MIN_HU` that counts as air in an image of unknown modality.
CT_AIR_FRACTION = 1e-3
#: An image that is not HU, has negative values and spans at most this is taken as normalised.
NORMALISED_MAX_RANGE = 100.0
#: The percentile of a normalised image taken as its background level (robust to noise below it).
BACKGROUND_PERCENTILE = 0.5
_SAMPLE_VOXELS = 1 << 20


@dataclass(frozen=True)
class IntensityProfile:
    """What the pipeline concluded about an image's intensities, and why.

    Attributes:
        hu: the values are CT Hounsfield units (crops are clamped to :data:`CT_CLAMP` before
            the z-score); otherwise the crop is z-scored without the clamp (MR, or an image
            already normalised: z-scored, scaled to 0-1, arbitrary units).
        reason: one sentence a user can check (the evidence).
        background: the value taken as the image's zero: 0, or for an image already normalised
            around 0 (negative values, a narrow range) its minimum, the level its background was
            moved to. Crops are sampled with it outside the image and measured from it, so the
            z-score over "voxels above background" (SAM-Med3D's ``x > 0``) sees the voxels it
            would have seen before the image was normalised.
    """

    hu: bool
    reason: str
    background: float = 0.0

    def to_dict(self) -> dict:
        return {"hu": self.hu, "reason": self.reason}

    def describe(self) -> str:
        return ("CT in Hounsfield units" if self.hu else "not Hounsfield units") + f" ({self.reason})"


def _normalised_background(array: np.ndarray) -> tuple[float, float, float]:
    """``(minimum, maximum, background)``: when the values look normalised around 0 (negative,
    spanning at most :data:`NORMALISED_MAX_RANGE`) the background is their
    :data:`BACKGROUND_PERCENTILE` th percentile (the minimum of an image whose background is
    constant; above the noise of one whose background is not), else 0."""
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if not (lo < 0 and hi - lo <= NORMALISED_MAX_RANGE):
        return lo, hi, 0.0
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLE_VOXELS)]
    return lo, hi, float(np.nanpercentile(sample, BACKGROUND_PERCENTILE))


def intensity_profile(volume: Volume) -> IntensityProfile:
    """CT in HU when the header's modality says CT; with no modality, only on evidence: air, at
    least :data:`CT_AIR_FRACTION` of the voxels below :data:`CT_MIN_HU`. Anything else (another
    modality, unsigned data, a z-scored or 0-1 image whose values stay far above -500) is not
    HU: its crops are z-scored without the CT clamp, measured from its background level
    (:attr:`IntensityProfile.background`). A range that merely could be HU is not taken for it."""
    array = volume.array
    if volume.modality is not None and volume.modality.upper() == "CT":
        return IntensityProfile(True, "the image's header gives the modality CT")
    if array.dtype.kind in "ub":
        why = (f"the image's header gives the modality {volume.modality}" if volume.modality is not None
               else "no modality in the header, and unsigned values cannot hold air at -1000 HU")
        return IntensityProfile(False, why)
    if volume.modality is None:
        share = int(np.count_nonzero(array < CT_MIN_HU)) / max(1, array.size)
        if share >= CT_AIR_FRACTION:
            return IntensityProfile(True, f"no modality in the header; {100 * share:.1f} % of the voxels are below "
                                    f"{CT_MIN_HU:.0f}, as air is in Hounsfield units")
    lo, hi, background = _normalised_background(array)
    if volume.modality is not None:
        why = f"the image's header gives the modality {volume.modality}"
    elif lo >= 0 and hi <= 1:
        why = "no modality in the header, and the values lie within 0-1 (scaled)"
    elif background:
        why = f"no modality in the header, and the values span {lo:.3g} to {hi:.3g}, as normalised (e.g. z-scored) images do"
    else:
        why = "no modality in the header, and the values show no air"
    if volume.modality is None:
        why += f": fewer than {100 * CT_AIR_FRACTION:.1f} % of the voxels are below {CT_MIN_HU:.0f}"
    if background:
        why += f"; crops are measured from {background:.3g} (its {BACKGROUND_PERCENTILE} th percentile) as the background"
    return IntensityProfile(False, why, background)


def is_ct(volume: Volume) -> bool:
    """Whether ``volume``'s values are CT Hounsfield units (:func:`intensity_profile`)."""
    return intensity_profile(volume).hu


def normalize_crop(crop: np.ndarray, ct: bool) -> np.ndarray:
    """Upstream's intensity normalisation of a crop (float32, any shape; new array).

    CT: clamp to [-1000, 1000] HU first. Then z-score with the mean and standard deviation of the
    voxels > 0 (``tio.ZNormalization(masking_method=lambda x: x > 0)``), applied to all voxels.
    With no voxel > 0 the whole crop's statistics are used; a constant crop becomes all zeros.
    """
    out = np.asarray(crop, dtype=np.float32)
    if ct:
        out = np.clip(out, *CT_CLAMP)
    values = out[out > 0]
    if values.size < 2:
        values = out.ravel()
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    out = out - np.float32(mean)
    if std > 0:
        out /= np.float32(std)
    return out.astype(np.float32, copy=False)


class VolumeSampler:
    """Cuts normalised crops out of one input volume (wraps it for SimpleITK once).

    Non-finite voxels (NaN, +-inf) are read as the image's lowest finite value, as
    :func:`~msam_core.io.load.load_volume` reads them, so a :class:`Volume` made by hand gives what
    the same image loaded from a file gives (one NaN would otherwise turn every crop into NaN and
    the mask empty).

    Attributes:
        volume: the input image.
        intensity: what its values were taken to be (:func:`intensity_profile`).
        ct: whether CT clamping applies (``intensity.hu``).

    Raises:
        InvalidVolume: no voxel of the image is finite.
    """

    def __init__(self, volume: Volume) -> None:
        from msam_core.io.load import finite_volume

        self.volume = volume
        values = finite_volume(volume, "the image")
        self.intensity = intensity_profile(values)
        self.ct = self.intensity.hu
        self._image = IndexImage(values.array)
        self._ras_to_voxel = np.linalg.inv(volume.affine)

    def crop_to_voxel(self, grid: CropGrid) -> np.ndarray:
        """``(4, 4)`` crop voxel index -> input voxel index."""
        return self._ras_to_voxel @ grid.affine

    def raw_crop(self, grid: CropGrid, interpolation: Interpolation = "linear") -> np.ndarray:
        """The input's intensities on ``grid``: ``float32 [a, b, c]``; outside the image the
        background level (``intensity.background``, 0 for all but normalised images)."""
        return self._image.resample(self.crop_to_voxel(grid), grid.shape, interpolation,
                                    self.intensity.background)

    def crop(self, grid: CropGrid) -> torch.Tensor:
        """The network input for ``grid``: ``float32`` tensor ``[1, 1, 128, 128, 128]``."""
        raw = self.raw_crop(grid, "linear")
        background = self.intensity.background
        if background:
            # measured from the background; interpolating it leaves float dust of ~1e-7 x |background|
            raw -= np.float32(background)
            raw[raw < np.float32(1e-5 * abs(background))] = 0.0
        crop = normalize_crop(raw, self.ct)
        return torch.from_numpy(crop)[None, None]

    def inside_image(self, grid: CropGrid, points_crop: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: which crop voxel positions fall inside the input image."""
        pts = np.asarray(points_crop, dtype=np.float64).reshape(-1, 3)
        m = self.crop_to_voxel(grid)
        vox = pts @ m[:3, :3].T + m[:3, 3]
        upper = np.asarray(self.volume.shape, dtype=np.float64) - 0.5
        return np.all((vox >= -0.5) & (vox <= upper), axis=1)


def mask_on_grid(mask: np.ndarray, volume: Volume, grid: CropGrid) -> np.ndarray:
    """A mask on the input grid resampled (nearest) onto ``grid``: ``bool [a, b, c]``."""
    dst_to_src = np.linalg.inv(volume.affine) @ grid.affine
    out = IndexImage(mask.astype(np.uint8)).resample(dst_to_src, grid.shape, "nearest", 0.0,
                                                     dtype=np.uint8)
    return out > 0


def mask_to_logits(mask_crop: np.ndarray, low_res: int = 32, scale: float = 8.0) -> torch.Tensor:
    """A binary crop mask ``[128, 128, 128]`` -> mask-prompt logits ``[1, 1, 32, 32, 32]``.

    Each low-res voxel gets ``scale * (2 * f - 1)`` where ``f`` is the fraction of its 4^3
    high-res voxels inside the mask: +8 fully inside, -8 fully outside, 0 on the edge.
    """
    t = torch.from_numpy(np.ascontiguousarray(mask_crop, dtype=np.float32))[None, None]
    frac = torch.nn.functional.adaptive_avg_pool3d(t, low_res)
    return scale * (2.0 * frac - 1.0)
