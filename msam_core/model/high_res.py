"""High-resolution image features for the mask decoder's last upscaling stage (optional).

SAM-Med3D's decoder sees the image only through the 8^3 token grid: one token per 16^3 voxels
(24 mm), so everything finer than a token must be learned by the ViT. SAM 2 adds stride-4 and
stride-8 backbone features into its decoder's upscaling path for this reason
(``use_high_res_features_in_sam``). ``ModelConfig.high_res_features`` does the same with a
small convolutional stem on the crop, at the decoder's output resolution (stride 4, 32^3):

``[B, 1, 128, 128, 128] -> [B, C, 32, 32, 32]`` with ``C = prompt_embed_dim // 8`` (the
upscaled channels), added before the decoder's last activation.

The decoder's tokens never see these features, so on their own they cannot tell the decoder
which intensities belong to *this* lesion. :meth:`HighResStem.prompted` adds that, as
prototype matching in few-shot segmentation does (masked average pooling, Wang et al., PANet,
ICCV 2019): the features at the positive clicks (and at the negative ones) are averaged into a
prototype, every position gets its cosine similarity to each prototype, and a 1x1x1
convolution mixes ``[features, similarity to positives, similarity to negatives]`` back into
``C`` channels. A click on a dark lesion thus marks every position that looks like it.

So that :meth:`MSAM.encode` still returns one 8^3 tensor (the embedding cache, the API and the
worker handle one tensor per crop), the features are folded into the token grid
(space-to-depth, 4^3 positions per token): the embedding is ``[B, E + 64 C, 8, 8, 8]``, tokens
first. :func:`fold` and :func:`unfold` are exact inverses.

With ``ModelConfig.click_regions`` the decoder also gets intensity regions grown from the clicks
(:mod:`msam_core.model.click_regions`), a parameter-free cue for the lesion's extent; the
crop pooled to the regions' grid (stride 2, 64^3) they need is folded into the embedding as
``POOL^3 = 8`` more channels at stride 4.

The SAM-Med3D and M-SAM configurations do not use this, so their checkpoints are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msam_core.model.click_regions import POOL, SCALES, RegionCache, click_cells, click_regions, pooled_intensity

#: Side of the block of high-resolution positions folded into one token.
FACTOR = 4


class HighResStem(nn.Module):
    """Three 3x3x3 convolutions (two of stride 2): ``[B, 1, S, S, S] -> [B, C, S/4, S/4, S/4]``.

    Receptive field 19 voxels (28 mm at 1.5 mm): local contrast, edges and texture.
    """

    def __init__(self, out_chans: int, hidden: int = 16, click_regions: bool = False) -> None:
        super().__init__()
        #: Also fold the pooled crop into the features and give :meth:`prompted` the regions
        #: grown from the clicks (:mod:`msam_core.model.click_regions`).
        self.click_regions = click_regions
        self.out_chans = out_chans
        self.net = nn.Sequential(
            nn.Conv3d(1, hidden, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv3d(hidden, hidden, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv3d(hidden, out_chans, kernel_size=3, padding=1),
        )
        extra = 2 + (2 * len(SCALES) if click_regions else 0)
        self.fuse = nn.Conv3d(out_chans + extra, out_chans, kernel_size=1)

    @property
    def channels(self) -> int:
        """Channels of :meth:`forward`'s output: ``C``, plus the pooled crop with ``click_regions``."""
        return self.out_chans + (self._POOLED_FOLD**3 if self.click_regions else 0)

    #: Fold factor from the regions' grid (stride 2) to the features' (stride 4).
    _POOLED_FOLD = FACTOR // POOL

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 1, S, S, S] -> [B, C (+8), S/4, S/4, S/4]`` (prompt-independent: cached with the
        embedding); with ``click_regions`` the last 8 channels are the crop average-pooled per 2^3
        voxels (:func:`pooled_intensity`), folded to stride 4."""
        features = self.net(image)
        if not self.click_regions:
            return features
        pooled = fold(pooled_intensity(image), self._POOLED_FOLD)
        return torch.cat([features, pooled.to(features.dtype)], dim=1)

    def prepare(self, features: torch.Tensor) -> StemFeatures:
        """The prompt-independent part of :meth:`prompted` for ``features [B, C (+8), G, G, G]``
        (:meth:`forward`): the same for every pass on one embedding, so a decode cache keeps it
        (:class:`~msam_core.model.decode_cache.DecodeCache`)."""
        pooled = None
        if self.click_regions:
            features, pooled = features[:, : self.out_chans], unfold(features[:, self.out_chans :], self._POOLED_FOLD)
        standardised, unit = standardise(features)
        return StemFeatures(features=features, pooled=pooled, standardised=standardised, unit=unit)

    def prompted(
        self, features: torch.Tensor | StemFeatures, points: torch.Tensor, labels: torch.Tensor, img_size: int,
        region_cache: RegionCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``features [B, C (+8), G, G, G]`` (:meth:`forward`, or :meth:`prepare`'s of it),
        ``points [B, N, 3]`` (crop voxels), ``labels [B, N]`` -> ``([B, C, G, G, G], regions)``:
        the features mixed with their similarity to the clicked ones (and, with ``click_regions``,
        the regions grown from the clicks, which are also returned, ``[B, 2 len(SCALES), G, G, G]``;
        else ``None``; ``region_cache``: see :class:`~msam_core.model.click_regions.RegionCache`)."""
        stem = features if isinstance(features, StemFeatures) else self.prepare(features)
        regions = None
        if stem.pooled is not None:
            regions = click_regions(stem.pooled, points, labels, img_size, cache=region_cache).to(stem.features.dtype)
        sim = click_similarity(stem.standardised, points, labels, img_size, unit=stem.unit)
        cues = [stem.features, sim.to(stem.features.dtype)] + ([regions] if regions is not None else [])
        return self.fuse(torch.cat(cues, dim=1)), regions


@dataclass(frozen=True)
class StemFeatures:
    """:meth:`HighResStem.prepare`'s output: what :meth:`HighResStem.prompted` computes from the
    features alone.

    Attributes:
        features: ``[B, C, G, G, G]``, the stem's features.
        pooled: ``[B, 1, 2G, 2G, 2G]``, the crop pooled for the click regions (``None`` without
            ``click_regions``).
        standardised: ``float32 [B, C, G, G, G]``, the features standardised per channel over the
            crop (:func:`standardise`).
        unit: ``float32 [B, C, G, G, G]``, ``standardised`` scaled to unit length along the
            channels at every position.
    """

    features: torch.Tensor
    pooled: torch.Tensor | None
    standardised: torch.Tensor
    unit: torch.Tensor


def standardise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, G, G, G] -> (standardised, unit)``, both ``float32 [B, C, G, G, G]``: each channel
    standardised over the crop (mean 0, standard deviation 1), and that scaled to unit length
    along the channels at every position (for cosine similarities)."""
    f = features.float()
    f = (f - f.mean(dim=(2, 3, 4), keepdim=True)) / (f.std(dim=(2, 3, 4), keepdim=True) + 1e-5)
    return f, nn.functional.normalize(f, dim=1)


def click_similarity(features: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, img_size: int,
                     unit: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of every position to the mean feature at the positive (label 1) and at
    the negative (label 0) clicks inside the crop: ``-> [B, 2, G, G, G]`` in ``[-1, 1]``; a
    channel is 0 where there is no such click. Features are standardised per channel over the
    crop first (:func:`standardise`), so the similarity compares what differs across the crop,
    not a common offset. With ``unit`` (:func:`standardise`'s second output), ``features`` are
    taken as standardised already (its first)."""
    b, c, g = features.shape[0], features.shape[1], features.shape[2]
    f, unit = standardise(features) if unit is None else (features, unit)
    flat, inside = click_cells(points, g, img_size)  # clicks outside this crop are not its prototypes
    at = torch.gather(f.reshape(b, c, -1), 2, flat[:, None, :].expand(b, c, -1))  # [B, C, N]
    out = []
    for value in (1, 0):
        weight = ((labels == value) & inside).float()[:, None, :]  # [B, 1, N]
        count = weight.sum(-1)  # [B, 1]
        proto = (at * weight).sum(-1) / count.clamp(min=1)  # [B, C]
        proto = nn.functional.normalize(proto, dim=1)
        sim = torch.einsum("bcxyz,bc->bxyz", unit, proto)
        out.append(sim * (count[:, 0] > 0).float()[:, None, None, None])
    return torch.stack(out, dim=1)


def fold(features: torch.Tensor, factor: int = FACTOR) -> torch.Tensor:
    """Space-to-depth: ``[B, C, fX, fY, fZ] -> [B, C f^3, X, Y, Z]``."""
    b, c, x, y, z = features.shape
    if x % factor or y % factor or z % factor:
        raise ValueError(f"feature grid {x}x{y}x{z} is not divisible by {factor}")
    g = features.reshape(b, c, x // factor, factor, y // factor, factor, z // factor, factor)
    return g.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * factor**3, x // factor, y // factor, z // factor)


def unfold(folded: torch.Tensor, factor: int = FACTOR) -> torch.Tensor:
    """Depth-to-space, the inverse of :func:`fold`: ``[B, C f^3, X, Y, Z] -> [B, C, fX, fY, fZ]``."""
    b, cf, x, y, z = folded.shape
    if cf % factor**3:
        raise ValueError(f"{cf} channels are not a multiple of {factor**3}")
    c = cf // factor**3
    g = folded.reshape(b, c, factor, factor, factor, x, y, z)
    return g.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, x * factor, y * factor, z * factor)
