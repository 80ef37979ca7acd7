"""SAM-Med3D's image encoder: a 3D ViT over 16^3 patches with decomposed relative positions.

Input ``[B, 1, 128, 128, 128]`` -> patch tokens ``[B, 8, 8, 8, E]`` -> ``depth`` blocks (windowed
attention in a 14^3 window, global attention in a few blocks) -> neck -> ``[B, out, 8, 8, 8]``.
State-dict names follow upstream (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``neck.0`` ...), so
official checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msam_core.model.common import LayerNorm3d, MLPBlock
from msam_core.model.lora import LoRAQV
from msam_core.model.rel_pos import padded_keys_logsumexp, real_key_bias, rel_pos_terms


class PatchEmbed3D(nn.Module):
    """Non-overlapping ``p^3`` patches: ``[B, 1, X, Y, Z] -> [B, X/p, Y/p, Z/p, E]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class Attention(nn.Module):
    """Multi-head self-attention with SAM-Med3D's relative positions over a cubic token grid.

    ``rel_pos_extent`` is the side of the attended cube: the window (14) for windowed blocks, the
    grid (8) for global ones. When it exceeds the grid, upstream zero-pads the grid to a window;
    here the padded tokens enter as one closed-form key (see :mod:`msam_core.model.rel_pos`).

    ``[B, G, G, G, dim] -> [B, G, G, G, dim]``.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, rel_pos_extent: int, lora_rank: int = 0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rel_pos_extent = rel_pos_extent
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        n_rel = 2 * rel_pos_extent - 1
        self.rel_pos_d = nn.Parameter(torch.zeros(n_rel, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(n_rel, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(n_rel, self.head_dim))
        self.lora = LoRAQV(dim, lora_rank) if lora_rank > 0 else None

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., 3*dim]`` (q | k | v), LoRA included."""
        qkv = self.qkv(x)
        if self.lora is None:
            return qkv
        dq, dv = self.lora(x)
        q, k, v = qkv.chunk(3, dim=-1)
        return torch.cat([q + dq, k, v + dv], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, dim = x.shape
        if not d == h == w:
            raise ValueError(f"the encoder needs a cubic token grid, got {d}x{h}x{w}")
        if d > self.rel_pos_extent:
            raise ValueError(f"token grid {d} exceeds the attention extent {self.rel_pos_extent}")
        nh, hd = self.num_heads, self.head_dim
        qkv = self.project_qkv(x).reshape(b, d * h * w, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, nH, N, hd]
        tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
        padded = self.rel_pos_extent > d
        q_pad = None
        if padded:
            bias = self.qkv.bias if self.qkv.bias is not None else x.new_zeros(3 * dim)
            q_pad, k_pad, v_pad = bias.to(q.dtype).view(3, nh, hd).unbind(0)
        a, bh, cw = rel_pos_terms(q.reshape(b, nh, d, h, w, hd), q_pad, tables)
        attn_bias = real_key_bias(a, bh, cw)
        if padded:
            attn_bias = torch.cat([attn_bias, padded_keys_logsumexp(a, bh, cw)], dim=-1)
            k = torch.cat([k, k_pad[None, :, None, :].expand(b, nh, 1, hd)], dim=2)
            v = torch.cat([v, v_pad[None, :, None, :].expand(b, nh, 1, hd)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), scale=hd**-0.5)
        out = out.transpose(1, 2).reshape(b, d, h, w, dim)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        rel_pos_extent: int,
        lora_rank: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, True, rel_pos_extent, lora_rank)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """``[B, 1, S, S, S] -> [B, out_chans, S/p, S/p, S/p]`` (S=128, p=16 for SAM-Med3D)."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        out_chans: int,
        window_size: int,
        global_attn_indexes: tuple[int, ...],
        lora_rank: int = 0,
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        if window_size and window_size < grid:
            raise ValueError(
                f"window {window_size} smaller than the {grid}^3 token grid: only one (padded) "
                "window per image is supported"
            )
        self.img_size = img_size
        self.patch_embed = PatchEmbed3D(patch_size, 1, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList()
        for i in range(depth):
            window = 0 if i in global_attn_indexes else window_size
            self.blocks.append(
                Block(embed_dim, num_heads, mlp_ratio, window or grid, lora_rank)
            )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
