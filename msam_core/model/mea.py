"""M-SAM's Mask-Enhanced Adapter (MEA).

SAM adds the mask (dense prompt) embedding to the image embedding before the decoder. M-SAM
replaces that sum by an adapter that lets the two refine each other:

1. Mutual Feature Enhancement Blocks (MFEB, one in M-SAM): a conv branch on each embedding
   (3^3 conv, norm, GELU, 1^3 conv, add & norm), the branches cross-added, then each stream
   passes a 6-head self-attention with relative positions and an MLP (add & norm).
2. A fusing attention block over the sum of the inputs and the MFEB outputs.

All tensors are ``[B, C, 8, 8, 8]``; the output replaces ``image + dense`` in the decoder.
Checkpoint names differ from M-SAM's ``bidatt.*``; :mod:`msam_core.checkpoints` maps them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msam_core.model.common import LayerNorm3d, MLPBlock
from msam_core.model.rel_pos import real_key_bias, rel_pos_terms


def _channels_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a channels-last module to ``[B, C, D, H, W]``."""
    return module(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class MEAAttention(nn.Module):
    """M-SAM's adapter attention unit: ``mlp(norm2(x + proj(attn(norm1(x)))))``.

    Global self-attention over the 8^3 grid with SAM-Med3D-style relative positions (same 3D
    broadcasting). Note: no residual around the MLP - as in M-SAM. ``[B, C, G, G, G] -> same``.
    """

    def __init__(self, dim: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm1 = LayerNorm3d(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm3d(dim)
        self.mlp = MLPBlock(dim, 4 * dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        nh, hd = self.num_heads, self.head_dim
        tokens = self.norm1(x).permute(0, 2, 3, 4, 1)
        qkv = self.qkv(tokens).reshape(b, d * h * w, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a, bh, cw = rel_pos_terms(q.reshape(b, nh, d, h, w, hd), None, (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=real_key_bias(a, bh, cw).to(q.dtype), scale=hd**-0.5)
        out = self.proj(out.transpose(1, 2).reshape(b, d, h, w, c)).permute(0, 4, 1, 2, 3)
        return _channels_last(self.mlp, self.norm2(out + x))


class MutualFeatureEnhancementBlock(nn.Module):
    """``(image, mask) [B, C, G, G, G] each -> (image', mask')``."""

    def __init__(self, dim: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.image_conv1 = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.image_norm = LayerNorm3d(dim)
        self.image_conv2 = nn.Conv3d(dim, dim, kernel_size=1)
        self.mask_conv1 = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.mask_norm = LayerNorm3d(dim)
        self.mask_conv2 = nn.Conv3d(dim, dim, kernel_size=1)
        self.image_addnorm1 = LayerNorm3d(dim)
        self.image_addnorm2 = LayerNorm3d(dim)
        self.image_addnorm3 = LayerNorm3d(dim)
        self.mask_addnorm1 = LayerNorm3d(dim)
        self.mask_addnorm2 = LayerNorm3d(dim)
        self.mask_addnorm3 = LayerNorm3d(dim)
        self.image_attn = MEAAttention(dim, num_heads, grid)
        self.mask_attn = MEAAttention(dim, num_heads, grid)
        self.image_mlp = MLPBlock(dim, 4 * dim)
        self.mask_mlp = MLPBlock(dim, 4 * dim)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_conv = self.image_conv2(F.gelu(self.image_norm(self.image_conv1(image))))
        image_conv = self.image_addnorm1(image_conv + image)
        mask_conv = self.mask_conv2(F.gelu(self.mask_norm(self.mask_conv1(mask))))
        mask_conv = self.mask_addnorm1(mask_conv + mask)
        # Cross-add: each stream sees the other's input.
        image_in = image_conv + image + mask
        mask_in = image + mask_conv + mask
        image_out = self.image_addnorm2(self.image_attn(image_in) + image_conv)
        image_out = self.image_addnorm3(_channels_last(self.image_mlp, image_out) + image_out)
        mask_out = self.mask_addnorm2(self.mask_attn(mask_in) + mask_conv)
        mask_out = self.mask_addnorm3(_channels_last(self.mask_mlp, mask_out) + mask_out)
        return image_out, mask_out


class MaskEnhancedAdapter(nn.Module):
    """``(image_embedding, mask_embedding) [B, C, G, G, G] -> fused [B, C, G, G, G]``."""

    def __init__(self, dim: int, num_heads: int = 6, grid: int = 8, num_blocks: int = 1) -> None:
        super().__init__()
        self.image_in_norm = LayerNorm3d(dim)
        self.mask_in_norm = LayerNorm3d(dim)
        self.blocks = nn.ModuleList(MutualFeatureEnhancementBlock(dim, num_heads, grid) for _ in range(num_blocks))
        self.fuse_attn = MEAAttention(dim, num_heads, grid)
        self.fuse_norm = LayerNorm3d(dim)
        self.fuse_mlp = MLPBlock(dim, 4 * dim)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = self.mask_in_norm(mask)
        image = self.image_in_norm(image)
        image_up, mask_up = image, mask
        for block in self.blocks:
            image_up, mask_up = block(image_up, mask_up)
        fused_in = image_up + image + mask_up + mask
        fused = self.fuse_norm(self.fuse_attn(fused_in) + fused_in)
        return fused + _channels_last(self.fuse_mlp, fused)
