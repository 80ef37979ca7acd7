"""The slow reference: SAM-Med3D's encoder attention as upstream computes it.

Pads the token grid to the full window and attends over every padded token, adding the
relative-position terms with upstream's 3D broadcasting. Used only by the tests (to prove the
fast path in :mod:`msam_core.model.image_encoder` equal) and by ``bench/model.py`` (to measure
the speed-up). Never used for inference.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from msam_core.model.image_encoder import Attention, ImageEncoderViT3D
from msam_core.model.rel_pos import gather_rel_pos


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Upstream's computation of ``attn(x)``: ``[B, G, G, G, C] -> [B, G, G, G, C]``."""
    b, g, _, _, dim = x.shape
    s = attn.rel_pos_extent
    if s > g:  # zero-pad after norm1, as upstream's window_partition3D does
        x = F.pad(x, (0, 0, 0, s - g, 0, s - g, 0, s - g))
    nh, hd = attn.num_heads, attn.head_dim
    qkv = attn.project_qkv(x).reshape(b, s**3, 3, nh, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * nh, s**3, hd).unbind(0)
    logits = (q * hd**-0.5) @ k.transpose(-2, -1)
    idx = torch.arange(s, device=x.device)
    rd, rh, rw = (gather_rel_pos(t, idx, idx).to(q.dtype) for t in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w))
    r_q = q.reshape(b * nh, s, s, s, hd)
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, rd)
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, rh)
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, rw)
    logits = (
        logits.view(b * nh, s, s, s, s, s, s)
        + rel_d[:, :, :, :, None, None]  # upstream's 3D broadcast, kept on purpose
        + rel_h[:, :, :, None, :, None]
        + rel_w[:, :, :, None, None, :]
    ).view(b * nh, s**3, s**3)
    out = logits.softmax(dim=-1) @ v
    out = out.view(b, nh, s, s, s, hd).permute(0, 2, 3, 4, 1, 5).reshape(b, s, s, s, dim)
    return attn.proj(out[:, :g, :g, :g].contiguous())


def reference_encode(encoder: ImageEncoderViT3D, image: torch.Tensor) -> torch.Tensor:
    """``encoder(image)`` with :func:`reference_attention` in every block."""
    x = encoder.patch_embed(image) + encoder.pos_embed
    for block in encoder.blocks:
        x = x + reference_attention(block.attn, block.norm1(x))
        x = x + block.mlp(block.norm2(x))
    return encoder.neck(x.permute(0, 4, 1, 2, 3))
