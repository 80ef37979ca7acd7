"""SAM-Med3D's prompt encoder: points -> sparse tokens, previous mask logits -> dense embedding.

State-dict names follow upstream (``pe_layer.positional_encoding_gaussian_matrix``,
``point_embeddings.{0,1}``, ``not_a_point_embed``, ``mask_downscaling``, ``no_mask_embed``).
Boxes are not embedded: upstream's 3D encoder has no box-corner embeddings, so boxes are used
by the pipeline to place the crop and derive point prompts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from msam_core.model.common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding; the Gaussian matrix ``[3, dim/3]`` is a checkpoint buffer.

    Output channels are ``[sin, cos, sin]`` of ``2*pi * (2c - 1) @ G`` (upstream's layout).
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def encode(self, coords01: torch.Tensor) -> torch.Tensor:
        """``[..., 3]`` coordinates normalised to [0, 1] -> ``[..., 3 * num_pos_feats]``."""
        gauss = self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * ((2 * coords01.to(gauss.dtype) - 1) @ gauss)
        return torch.cat([torch.sin(proj), torch.cos(proj), torch.sin(proj)], dim=-1)

    def dense(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Encoding of every cell of a grid: ``[3 * num_pos_feats, X, Y, Z]``.

        Upstream stacks the axes as (axis 1, axis 0, axis 2), each normalised by the size of a
        possibly different axis; for the cubic grids used here that is a plain (1, 0, 2) swap.
        """
        x, y, z = size
        gauss = self.positional_encoding_gaussian_matrix
        i0 = (torch.arange(x, device=gauss.device, dtype=gauss.dtype) + 0.5)[:, None, None].expand(x, y, z)
        i1 = (torch.arange(y, device=gauss.device, dtype=gauss.dtype) + 0.5)[None, :, None].expand(x, y, z)
        i2 = (torch.arange(z, device=gauss.device, dtype=gauss.dtype) + 0.5)[None, None, :].expand(x, y, z)
        coords = torch.stack([i1 / x, i0 / y, i2 / z], dim=-1)
        return self.encode(coords).permute(3, 0, 1, 2)

    def points(self, points: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """``[B, N, 3]`` pixel-centre coordinates in the crop -> ``[B, N, 3 * num_pos_feats]``."""
        scale = torch.tensor(image_size, device=points.device, dtype=points.dtype)
        return self.encode(points / scale)


class PromptEncoder3D(nn.Module):
    """Embeds points and a previous mask.

    Args:
        embed_dim: token width (384 in SAM-Med3D; divisible by 3).
        image_embedding_size: token grid of the image embedding, e.g. ``(8, 8, 8)``.
        input_image_size: crop size in voxels, e.g. ``(128, 128, 128)``.
        mask_in_chans: hidden channels of the mask downscaling (16).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int, int],
        input_image_size: tuple[int, int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))  # neg, pos
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: ``[1, embed_dim, 8, 8, 8]``."""
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``points [B, N, 3]`` (voxel indices), ``labels [B, N]`` (1 pos, 0 neg, -1 none).

        Returns ``[B, N + 1, embed_dim]``: upstream appends one padding point (label -1).
        """
        b = points.shape[0]
        dtype = self.pe_layer.positional_encoding_gaussian_matrix.dtype
        points = torch.cat([points.to(dtype) + 0.5, points.new_zeros(b, 1, 3, dtype=dtype)], dim=1)
        labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        emb = self.pe_layer.points(points, self.input_image_size)
        is_pad = (labels == -1)[..., None]
        emb = torch.where(is_pad, self.not_a_point_embed.weight.to(emb.dtype), emb)
        emb = emb + (labels == 0)[..., None] * self.point_embeddings[0].weight
        emb = emb + (labels == 1)[..., None] * self.point_embeddings[1].weight
        return emb

    def embed_mask(self, mask_logits: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Previous logits ``[B, 1, 32, 32, 32]`` (or ``None``) -> ``[B, embed_dim, 8, 8, 8]``."""
        if mask_logits is not None:
            return self.mask_downscaling(mask_logits)
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)

    def forward(
        self, points: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(sparse [B, N+1, E], dense [B, E, 8, 8, 8])``."""
        return self.embed_points(points, labels), self.embed_mask(mask_logits, points.shape[0])
