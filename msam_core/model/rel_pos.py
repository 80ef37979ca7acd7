"""Decomposed relative-position attention of SAM-Med3D's ViT, computed without padding.

**What upstream computes.** SAM-Med3D adds three relative-position terms to the attention logits
(MViTv2's decomposition, lifted from 2D SAM to 3D). For a query at grid position ``(d, h, w)``
and a key at ``(kd, kh, kw)``, with ``q`` the *unscaled* query vectors and ``Rd, Rh, Rw`` the
tables gathered at relative offsets (``R[i, j] = table[i - j + S - 1]`` over an extent ``S``),
upstream's broadcasting (``rel_d[:, :, :, :, None, None]``, ``rel_h[:, :, :, None, :, None]``,
``rel_w[:, :, :, None, None, :]`` against a ``[B, d, h, w, kd, kh, kw]`` view) adds

    bias = q[d, h, w]  . Rd[d,  kw]        (the depth table lands on the key's w axis)
         + q[d, h, kd] . Rh[h,  kw]        (query row taken at w := kd)
         + q[d, h, kh] . Rw[kh, kw]        (query row taken at w := kh)

2D SAM's two-axis version broadcasts as intended; the 3D lift does not. The public checkpoints
were trained with this, so it is reproduced exactly. Every term depends on the key's ``kw``.

**Windowed blocks.** The 8^3 token grid is zero-padded to one 14^3 window *after* norm1, so every
padded token has ``q = b_q``, ``k = b_k``, ``v = b_v`` (the qkv bias; LoRA adds nothing to a zero
input). Upstream attends over all 2,744 window tokens. Here the 512 real keys are attended to
directly, and the 2,232 padded keys - which share one key and one value - are folded into one
extra key ``k = b_k, v = b_v`` whose logit bias is the log-sum-exp of their relative-position
terms. That sum factorises over the three key axes, so it costs O(S^2) per query instead of
O(S^3). The result is mathematically identical to upstream's (see tests/unit/model).
"""

from __future__ import annotations

import torch


def gather_rel_pos(table: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """``table[q - k + S - 1]`` for all pairs: ``[2S-1, C] -> [len(q_index), len(k_index), C]``."""
    extent = (table.shape[0] + 1) // 2
    return table[q_index[:, None] - k_index[None, :] + extent - 1]


def rel_pos_terms(
    q: torch.Tensor,
    q_pad: torch.Tensor | None,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three factors of upstream's relative-position bias.

    Args:
        q: unscaled queries ``[B, nH, G, G, G, C]`` of the real ``G^3`` grid.
        q_pad: ``[nH, C]`` query of a padded token (the qkv bias), or ``None`` when the extent
            ``S`` of the tables equals ``G`` (global attention, nothing padded).
        tables: ``rel_pos_d, rel_pos_h, rel_pos_w``, each ``[2S-1, C]``.

    Returns:
        ``A [B, nH, G, G, G, S]`` indexed ``(d, h, w, kw)``,
        ``Bh [B, nH, G, G, S, S]`` indexed ``(d, h, kd, kw)``,
        ``Cw [B, nH, G, G, S, S]`` indexed ``(d, h, kh, kw)``;
        the bias of key ``(kd, kh, kw)`` for query ``(d, h, w)`` is
        ``A[d,h,w,kw] + Bh[d,h,kd,kw] + Cw[d,h,kh,kw]``.
    """
    table_d, table_h, table_w = tables
    grid = q.shape[2]
    extent = (table_d.shape[0] + 1) // 2
    real = torch.arange(grid, device=q.device)
    full = torch.arange(extent, device=q.device)
    rd = gather_rel_pos(table_d, real, full)  # [G, S, C]
    rh = gather_rel_pos(table_h, real, full)  # [G, S, C]
    rw = gather_rel_pos(table_w, full, full)  # [S, S, C]
    if extent > grid:
        if q_pad is None:
            raise ValueError("a padded window needs the query of a padded token (q_pad)")
        b, nh = q.shape[:2]
        pad = q_pad.to(q.dtype)[None, :, None, None, None, :].expand(b, nh, grid, grid, extent - grid, -1)
        q_rows = torch.cat([q, pad], dim=4)  # [B, nH, G, G, S, C]: q at (d, h, x), x over S
    else:
        q_rows = q
    a = torch.einsum("bndhwc,dkc->bndhwk", q, rd.to(q.dtype))
    bh = torch.einsum("bndhxc,hkc->bndhxk", q_rows, rh.to(q.dtype))
    cw = torch.einsum("bndhxc,xkc->bndhxk", q_rows, rw.to(q.dtype))
    return a, bh, cw


def real_key_bias(a: torch.Tensor, bh: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """Bias for the real keys: ``[B, nH, G^3 queries, G^3 keys]`` (keys flattened ``kd, kh, kw``)."""
    b, nh, g = a.shape[:3]
    bias = (
        a[:, :, :, :, :, None, None, :g]  # [B,nH,d,h,w,1,1,kw]
        + bh[:, :, :, :, None, :g, None, :g]  # [B,nH,d,h,1,kd,1,kw]
        + cw[:, :, :, :, None, None, :g, :g]  # [B,nH,d,h,1,1,kh,kw]
    )
    return bias.reshape(b, nh, g**3, g**3)


def padded_keys_logsumexp(a: torch.Tensor, bh: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """``log sum exp`` of the bias over every padded key of the window: ``[B, nH, G^3, 1]``.

    For each key column ``kw`` the padded ``(kd, kh)`` are all ``S^2`` pairs when ``kw >= G``,
    else the two disjoint boxes ``kd >= G`` and ``kd < G, kh >= G``; over each box the sum of
    ``exp(Bh + Cw)`` is a product of one-axis sums. No subtraction, so no cancellation.
    """
    b, nh, g = a.shape[:3]
    lse = torch.logsumexp
    bh_all, bh_hi, bh_lo = lse(bh, dim=4), lse(bh[:, :, :, :, g:], dim=4), lse(bh[:, :, :, :, :g], dim=4)
    cw_all, cw_hi = lse(cw, dim=4), lse(cw[:, :, :, :, g:], dim=4)  # each [B, nH, d, h, kw]
    inner = torch.cat(
        [
            torch.logaddexp(bh_hi + cw_all, bh_lo + cw_hi)[..., :g],  # kw < G
            (bh_all + cw_all)[..., g:],  # kw >= G: every (kd, kh)
        ],
        dim=-1,
    )
    total = lse(a + inner[:, :, :, :, None, :], dim=-1)  # [B, nH, d, h, w]
    return total.reshape(b, nh, g**3, 1)
