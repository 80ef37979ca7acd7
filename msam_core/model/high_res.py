"""High-resolution image features for the mask decoder's last upscaling stage (optional).

SAM-Med3D's decoder sees the image only through the 8^3 token grid: one token per 16^3 voxels
(24 mm), so everything finer than a token must be learned by the ViT. SAM 2 adds stride-4 and
stride-8 backbone features into its decoder's upscaling path for this reason
(``use_high_res_features_in_sam``). ``ModelConfig.high_res_features`` does the same with a
small convolutional stem on the crop, at the decoder's output resolution (stride 4, 32^3):

``[B, 1, 128, 128, 128] -> [B, C, 32, 32, 32]`` with ``C = prompt_embed_dim // 8`` (the
upscaled channels), added before the decoder's last activation.

So that :meth:`MSAM.encode` still returns one 8^3 tensor (the embedding cache, the API and the
worker handle one tensor per crop), the features are folded into the token grid
(space-to-depth, 4^3 positions per token): the embedding is ``[B, E + 64 C, 8, 8, 8]``, tokens
first. :func:`fold` and :func:`unfold` are exact inverses.

The SAM-Med3D and M-SAM configurations do not use this, so their checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

#: Side of the block of high-resolution positions folded into one token.
FACTOR = 4


class HighResStem(nn.Module):
    """Three 3x3x3 convolutions (two of stride 2): ``[B, 1, S, S, S] -> [B, C, S/4, S/4, S/4]``.

    Receptive field 19 voxels (28 mm at 1.5 mm): local contrast, edges and texture.
    """

    def __init__(self, out_chans: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, hidden, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv3d(hidden, hidden, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv3d(hidden, out_chans, kernel_size=3, padding=1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


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
