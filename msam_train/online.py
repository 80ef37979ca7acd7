"""Online lesion synthesis in torch: a fresh lesion in real anatomy for every training crop.

The offline generator (:mod:`msam_train.synth`) writes a fixed set of cases and the crop
cache cuts a fixed set of crops from them; here the same lesions are drawn on the training device
at every step from a pack (:mod:`msam_train.pack`), so the network never sees one lesion
twice and no crop cache exists. Every random parameter comes from the offline generator's own
draw functions (``synth.draw_*``, on a numpy generator), so the two cannot drift apart; only the
arrays are made differently (torch on the device instead of scipy):

- **shape**: the ellipsoid of :func:`~msam_train.synth.draw_axes` turned by
  :func:`~msam_train.synth.draw_rotation`, deformed by a smooth displacement field, its
  radius modulated by smooth noise (lobulation), with 0-3 satellites; clipped to its organ, at
  least :data:`~msam_train.synth.MIN_VOXELS` voxels, 3-60 mm by the organ's range;
- **intensity**: hypo/hyper (solid/ground-glass in the lung) relative to the organ's median,
  a band-limited texture, the scan's own fine noise kept, an optional enhancing rim and an
  optional necrotic core;
- **edge**: partial-volume blur of the blend weight, kept inside the (dilated) organ;
- **crop**: 128^3 voxels around a lesion voxel drawn with probability proportional to its depth
  in the lesion (as the crop cache draws centres), zero outside the scan, normalised as inference
  normalises; then :func:`~msam_train.data.augment` (flips, intensity, noise, and with
  ``thick_p`` the thick-slice simulation), as the cached crops get.

Smooth noise is white noise filtered by a periodic Gaussian in the Fourier domain, as scipy's
``gaussian_filter(mode="wrap")`` of the offline generator; the other blurs are separable
Gaussian convolutions with scipy's mirrored edges and 4-sigma kernels.

Array axes: every volume is ``[i, j, k]`` on its scan's 1.5 mm RAS grid (the pack's), and a crop's
``[a, b, c]`` runs along R, A, S, as the pipeline's crops do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from msam_train import synth
from msam_train.data import augment
from msam_train.pack import CROP, Pack, PackedScan, normalise_crop

#: Voxels of the organ near the lesion needed to take the organ's intensity from there.
LOCAL_ORGAN_VOXELS = 30


@dataclass(frozen=True)
class Lesion:
    """What :func:`insert_lesion` drew (the statistics tests compare these with the offline ones)."""

    organ: str
    diameter_mm: float
    voxels: int
    contrast: str
    rim: bool
    necrosis: bool
    satellites: int
    centre: tuple[int, int, int]
    box: tuple[slice, ...]


# -- filters -------------------------------------------------------------------------------------
def smooth_noise(shape: tuple[int, ...], sigma: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """White noise low-passed by a periodic Gaussian of ``sigma`` voxels, scaled to unit standard
    deviation (the offline ``_smooth_noise``)."""
    noise = torch.randn(shape, generator=generator, device=device)
    spectrum = torch.fft.rfftn(noise)
    gain = torch.ones((), device=device)
    for axis, n in enumerate(shape):
        freq = torch.fft.rfftfreq(n, device=device) if axis == len(shape) - 1 else torch.fft.fftfreq(n, device=device)
        g = torch.exp(-2 * (math.pi * sigma * freq) ** 2)
        gain = gain * g.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    out = torch.fft.irfftn(spectrum * gain, s=shape)
    std = out.std(correction=0)
    return out / std if float(std) > 0 else out


def _mirror_pad(x: torch.Tensor, r: int, axis: int) -> torch.Tensor:
    """Pad ``r`` voxels at both ends of ``axis`` the way scipy's ``mode="reflect"`` does (the edge
    voxel repeated: ``c b a | a b c``), repeated for arrays shorter than ``r``."""
    while r > 0:
        n = x.shape[axis]
        take = min(r, n)
        head = x.narrow(axis, 0, take).flip(axis)
        tail = x.narrow(axis, n - take, take).flip(axis)
        x = torch.cat([head, x, tail], axis)
        r -= take
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma)`` (mirrored edges, kernel of 4 sigma) of a 3-D
    tensor, as three 1-D convolutions."""
    r = int(4.0 * sigma + 0.5)
    if r < 1:
        return x.clone()
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
    out = x.float()
    for axis in range(3):
        moved = _mirror_pad(out, r, axis).movedim(axis, -1)
        shape = moved.shape
        conv = F.conv1d(moved.reshape(-1, 1, shape[-1]), kernel).reshape(*shape[:-1], shape[-1] - 2 * r)
        out = conv.movedim(-1, axis)
    return out.contiguous()


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """One step of binary dilation with the 6-neighbour cross (scipy's default structure)."""
    m = mask.float()[None, None]
    cross = torch.zeros(1, 1, 3, 3, 3, device=mask.device)
    cross[0, 0, 1, 1, :] = cross[0, 0, 1, :, 1] = cross[0, 0, :, 1, 1] = 1
    return F.conv3d(m, cross, padding=1)[0, 0] > 0


# -- one lesion ----------------------------------------------------------------------------------
def lesion_level(rng: np.random.Generator, generator: torch.Generator, size: int, radius_vox: float,
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """A level set ``< 1`` inside the lesion on a cube of ``size`` voxels centred on the lesion:
    ``(level [size]^3 float32, satellites)`` (the offline :func:`~msam_train.synth.lesion_level`)."""
    shape = (size, size, size)
    axes = torch.as_tensor(synth.draw_axes(rng, radius_vox), dtype=torch.float32, device=device)
    rot = torch.as_tensor(synth.draw_rotation(rng), dtype=torch.float32, device=device)
    c = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    grid = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1)  # [S, S, S, 3]
    warp = torch.stack([smooth_noise(shape, synth.warp_sigma(radius_vox), generator, device) for _ in range(3)], -1)
    warped = grid + warp * (synth.draw_warp(rng) * radius_vox)
    level = torch.linalg.vector_norm((warped @ rot) / axes, dim=-1)
    lobulation = synth.draw_lobulation(rng)
    level = level * (1 + lobulation * smooth_noise(shape, synth.lobulation_sigma(radius_vox), generator, device))
    satellites = synth.draw_satellite_count(rng, radius_vox)
    for _ in range(satellites):
        centre, r = synth.draw_satellite(rng, radius_vox)
        dist = torch.linalg.vector_norm(grid - torch.as_tensor(centre, dtype=torch.float32, device=device), dim=-1)
        level = torch.minimum(level, dist / r)
    return level, satellites


class DeviceScan:
    """A pack's scan on the training device: image, organ masks, each organ's voxels and
    whole-organ intensity statistics (used where too little of the organ lies near a lesion)."""

    def __init__(self, scan: PackedScan, device: torch.device) -> None:
        self.name, self.modality, self.device = scan.name, scan.modality, device
        self.image = torch.from_numpy(np.ascontiguousarray(scan.image, np.float32)).to(device)
        self.organs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in sorted(scan.organs.items())}
        self.voxels = {k: torch.nonzero(v) for k, v in self.organs.items()}
        self.organ_stats = {}
        for k, v in self.organs.items():
            ref = self.image[v]
            self.organ_stats[k] = (float(ref.median()), float(ref.std(correction=0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


def insert_lesion(rng: np.random.Generator, generator: torch.Generator, scan: DeviceScan, organ: str,
                  tries: int = 20) -> tuple[torch.Tensor, torch.Tensor, Lesion] | None:
    """Draw one lesion in ``organ`` of ``scan`` (the offline
    :func:`~msam_train.synth.insert_lesion`): ``(image box with the lesion, lesion mask box,
    what was drawn)``, the boxes at ``Lesion.box`` of the scan; ``None`` when no placement worked."""
    organ_mask, candidates = scan.organs[organ], scan.voxels[organ]
    if len(candidates) == 0:
        return None
    dims = torch.tensor(scan.shape, device=scan.device)
    for _ in range(tries):
        diameter = synth.draw_diameter(rng, organ)
        radius = diameter / 2 / synth.SPACING_MM
        centre = candidates[int(rng.integers(len(candidates)))]
        half = synth.lesion_half_width(radius)
        lo = torch.clamp(centre - half, min=0)
        hi = torch.minimum(centre + half + 1, dims)
        lo_l, hi_l, centre_l = lo.tolist(), hi.tolist(), centre.tolist()
        box = tuple(slice(a, b) for a, b in zip(lo_l, hi_l))
        level_full, satellites = lesion_level(rng, generator, 2 * half + 1, radius, scan.device)
        off = [c - half - a for c, a in zip(centre_l, lo_l)]  # where the full cube starts relative to the box
        level = level_full[tuple(slice(-o, -o + (b - a)) for o, a, b in zip(off, lo_l, hi_l))]
        local_organ = organ_mask[box]
        shape_mask = (level < 1) & local_organ
        voxels = int(shape_mask.sum())
        if voxels < synth.MIN_VOXELS:
            continue
        image, kind, rim, necrosis = render(rng, generator, scan, organ, box, shape_mask, level, local_organ)
        info = Lesion(organ, round(diameter, 2), voxels, kind, rim, necrosis, satellites, tuple(centre_l), box)
        return image, shape_mask, info
    return None


def render(rng: np.random.Generator, generator: torch.Generator, scan: DeviceScan, organ: str, box: tuple[slice, ...],
           shape_mask: torch.Tensor, level: torch.Tensor, local_organ: torch.Tensor) -> tuple[torch.Tensor, str, bool, bool]:
    """The scan's ``box`` with the lesion blended in (the offline ``_render``):
    ``(image box, contrast kind, rim, necrosis)``."""
    local = scan.image[box]
    if int(local_organ.sum()) > LOCAL_ORGAN_VOXELS:
        ref = local[local_organ]
        organ_mean, organ_std = float(ref.median()), float(ref.std(correction=0))
    else:
        organ_mean, organ_std = scan.organ_stats[organ]
    kind, mean = synth.draw_contrast(rng, scan.modality, organ, organ_mean, organ_std)
    texture_amp, texture_sigma = synth.draw_texture(rng, scan.modality, organ_mean, organ_std)
    texture = smooth_noise(tuple(local.shape), texture_sigma, generator, scan.device) * texture_amp
    fine = local - gaussian_blur(local, 1.0)  # the scan's own noise, kept
    lesion = mean + texture + fine
    diameter_mm = 2 * (3 * float(shape_mask.sum()) / (4 * math.pi)) ** (1 / 3) * synth.SPACING_MM
    necrosis = synth.draw_necrosis(rng, diameter_mm)
    rim = synth.draw_rim(rng, diameter_mm)
    delta = mean - organ_mean
    if necrosis:
        core_level, core_value = synth.draw_core(rng, scan.modality, organ_mean, delta)
        lesion = torch.where(level < core_level, core_value + 0.5 * texture + fine, lesion)
    if rim:
        ring_level, boost = synth.draw_ring(rng, delta, organ_std)
        lesion = torch.where((level > ring_level) & (level < 1), lesion + boost, lesion)
    weight = gaussian_blur(shape_mask.float(), synth.draw_blur(rng))
    weight = torch.where(shape_mask, weight.clamp(min=0.5), weight)
    weight = weight * dilate(local_organ)  # no blur over a different organ
    return (1 - weight) * local + weight * lesion, kind, rim, necrosis


def crop_centre(rng: np.random.Generator, mask: torch.Tensor) -> tuple[int, int, int]:
    """A voxel of ``mask`` (a lesion's box) drawn with probability proportional to its depth in the
    lesion, as the crop cache draws its centres (:func:`~msam_train.data.crop_centres`)."""
    sub = mask.cpu().numpy()
    depth = ndimage.distance_transform_edt(sub)
    inside = np.flatnonzero(depth > 0)
    p = depth.ravel()[inside]
    chosen = int(rng.choice(inside, p=p / p.sum()))
    return tuple(int(v) for v in np.unravel_index(chosen, sub.shape))  # type: ignore[return-value]


def cut(volume: torch.Tensor, corner: list[int], fill: float = 0.0, size: int = CROP) -> torch.Tensor:
    """``size``^3 voxels of ``volume`` from voxel ``corner`` on, ``fill`` outside it."""
    out = torch.full((size,) * 3, fill, dtype=volume.dtype, device=volume.device)
    src = tuple(slice(max(a, 0), min(a + size, n)) for a, n in zip(corner, volume.shape))
    if all(s.stop > s.start for s in src):
        out[tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, corner))] = volume[src]
    return out


class OnlineCrops:
    """Training crops with a freshly synthesised lesion each, drawn on ``device`` from a pack's
    training scans: ``sample(rng)`` gives ``(image [1,128,128,128] float32 normalised, mask
    [1,128,128,128] float32, first click [3] float32)`` like :class:`~msam_train.data.CropDataset`.

    A crop: a training scan and one of its organs, uniformly (as ``msam data synth`` picks a
    case's scan round robin and each lesion's organ uniformly), one lesion there, a crop centred
    on one of its voxels (drawn by depth), normalised, then :func:`~msam_train.data.augment`.
    Every draw comes from ``rng`` (numpy, for the parameters) and one torch generator on the
    device seeded from it (for the noise fields): the same seed gives the same crops on one device.
    """

    def __init__(self, pack: Pack, device: torch.device | str = "cpu", thick_p: float = 0.0) -> None:
        self.device = torch.device(device)
        self.scans = [DeviceScan(s, self.device) for s in pack.training_scans if s.organs]
        if not self.scans:
            raise ValueError(f"pack {pack.path} has no training scan with an organ mask")
        self.thick_p = float(thick_p)
        self.sha256 = pack.sha256

    def lesion(self, rng: np.random.Generator) -> tuple[DeviceScan, torch.Tensor, torch.Tensor, Lesion]:
        """A scan and a lesion in it: ``(scan, image box, mask box, lesion)``."""
        generator = torch.Generator(self.device).manual_seed(int(rng.integers(2**62)))
        while True:
            scan = self.scans[int(rng.integers(len(self.scans)))]
            organs = sorted(scan.organs)
            drawn = insert_lesion(rng, generator, scan, organs[int(rng.integers(len(organs)))])
            if drawn is not None:
                return (scan, *drawn)

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scan, image_box, mask_box, info = self.lesion(rng)
        centre = [b.start + v for b, v in zip(info.box, crop_centre(rng, mask_box))]
        corner = [c - CROP // 2 for c in centre]
        image = cut(scan.image, corner)
        mask = torch.zeros((CROP,) * 3, dtype=torch.bool, device=self.device)
        # the lesion's box, moved into crop coordinates and clipped to the crop
        src, dst = [], []
        for b, c in zip(info.box, corner):
            lo, hi = max(b.start, c), min(b.stop, c + CROP)
            src.append(slice(lo - b.start, hi - b.start))
            dst.append(slice(lo - c, hi - c))
        image[tuple(dst)] = image_box[tuple(src)]
        mask[tuple(dst)] = mask_box[tuple(src)]
        image = normalise_crop(image, scan.modality == "CT")[None]
        click = torch.full((3,), float(CROP // 2), device=self.device)
        return augment(image, mask.float()[None], click, rng, self.thick_p)

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [self.sample(rng) for _ in range(size)]
        return tuple(torch.stack([x[i] for x in items]) for i in range(3))  # type: ignore[return-value]
