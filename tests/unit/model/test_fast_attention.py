"""The closed-form padded-window attention equals upstream's padded computation."""

from __future__ import annotations

import itertools

import pytest
import torch

from msam_core.model.image_encoder import Attention, ImageEncoderViT3D
from tests.fixtures.reference import reference_attention, reference_encode
from msam_core.model.rel_pos import padded_keys_logsumexp, rel_pos_terms


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


@pytest.mark.parametrize(
    "grid,extent,lora",
    [(8, 14, 0), (8, 14, 4), (8, 8, 0), (4, 14, 2), (5, 7, 0), (3, 3, 0)],
)
def test_attention_equals_reference(grid, extent, lora):
    attn = Attention(dim=48, num_heads=4, qkv_bias=True, rel_pos_extent=extent, lora_rank=lora).double()
    randomise(attn, seed=grid * 100 + extent + lora)
    x = torch.randn(2, grid, grid, grid, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast, ref = attn(x), reference_attention(attn, x)
    assert (fast - ref).abs().max() / ref.abs().max() < 1e-12


def test_padded_logsumexp_matches_brute_force():
    g, s, c = 3, 6, 5
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, g, g, g, c, dtype=torch.float64, generator=gen)
    q_pad = torch.randn(2, c, dtype=torch.float64, generator=gen)
    tables = tuple(torch.randn(2 * s - 1, c, dtype=torch.float64, generator=gen) for _ in range(3))
    a, bh, cw = rel_pos_terms(q, q_pad, tables)
    fast = padded_keys_logsumexp(a, bh, cw).reshape(2, g, g, g)
    brute = torch.empty_like(fast)
    for d, h, w in itertools.product(range(g), repeat=3):
        terms = [
            a[0, :, d, h, w, kw] + bh[0, :, d, h, kd, kw] + cw[0, :, d, h, kh, kw]
            for kd, kh, kw in itertools.product(range(s), repeat=3)
            if max(kd, kh, kw) >= g
        ]
        brute[:, d, h, w] = torch.logsumexp(torch.stack(terms, dim=-1), dim=-1)
    assert torch.allclose(fast, brute, rtol=0, atol=1e-12)


def test_padded_tokens_carry_weight():
    """With a large key bias, the padded tokens dominate: the closed-form term must not be dropped."""
    attn = Attention(dim=16, num_heads=2, qkv_bias=True, rel_pos_extent=6).double()
    randomise(attn, seed=3)
    with torch.no_grad():
        attn.qkv.bias[16:32] = 5.0  # key bias: every padded key gets a large logit
    x = torch.randn(1, 4, 4, 4, 16, dtype=torch.float64)
    fast, ref = attn(x), reference_attention(attn, x)
    assert torch.allclose(fast, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    unpadded = Attention(dim=16, num_heads=2, qkv_bias=True, rel_pos_extent=4).double()
    assert (fast - ref).abs().max() < (fast - reference_attention(unpadded, x)).abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_whole_encoder_equals_reference(dtype, tol):
    enc = ImageEncoderViT3D(128, 16, 96, 3, 4, 4.0, 48, 14, (1,), lora_rank=4).to(dtype)
    randomise(enc, seed=11)
    x = torch.randn(2, 1, 128, 128, 128, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast, ref = enc(x), reference_encode(enc, x)
    assert fast.shape == (2, 48, 8, 8, 8)
    assert ((fast - ref).abs().max() / ref.abs().max()).item() < tol


def test_cpu_bf16_autocast_stays_close():
    """Reduced precision follows the same maths (what CUDA autocast runs), within bf16 accuracy."""
    enc = ImageEncoderViT3D(128, 16, 96, 2, 4, 4.0, 48, 14, (1,))
    randomise(enc, seed=5, scale=0.1)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = enc(x)
    assert half.dtype in (torch.bfloat16, torch.float32)
    assert ((half.float() - full).abs().max() / full.abs().max()).item() < 0.1
