"""Logits straight from the click regions, weighted per prompt (optional; not in SAM-Med3D or M-SAM).

The click regions (:mod:`msam_core.model.click_regions`) enter the decoder's last upscaling
stage as input channels, mixed with the image features. A small model trained from scratch on a
CPU budget learns little from them there: its first-click masks stay a blob of typical size,
while the regions alone cover large lesions far better. ``ModelConfig.region_logits`` gives the
regions a direct, linear path to the logits, so that trusting them needs no learning:

    logits += sum_k w_k r_k + w_0,    w = w_prior + A t

``r [B, 2S, G, G, G]``: the regions (positives' ``S`` scales, then negatives'); ``t [B, E]``: the
first mask token after the decoder's transformer (it has attended to the image and the clicks);
``A``: a linear map, zero at the start, that learns which scale fits this lesion (the best scale
differs from lesion to lesion; the hypernetwork heads of SAM's decoder weight the upscaled
features the same way); ``w_prior``: learned, starting at ``+weight`` per positive scale,
``-weight`` per negative scale and ``w_0 = -weight S / 2``. With ``S = 3`` and ``weight = 2``
a cell that lies in the positive regions of at least two scales starts at a positive logit:
at initialisation the prediction is the middle scale's region, plus the decoder's own logits.
"""

from __future__ import annotations

import torch
from torch import nn

from msam_core.model.click_regions import SCALES


class RegionLogits(nn.Module):
    """``token [B, E]``, ``regions [B, 2S, G, G, G]`` in ``[0, 1]`` -> ``[B, 1, G, G, G]`` logits."""

    def __init__(self, token_dim: int, scales: int = len(SCALES), weight: float = 2.0) -> None:
        super().__init__()
        self.scales = scales
        prior = [weight] * scales + [-weight] * scales + [-weight * scales / 2]
        #: ``w_prior``: one weight per region channel, then the offset ``w_0``.
        self.prior = nn.Parameter(torch.tensor(prior))
        #: ``A``: the per-prompt change of the weights, zero at the start.
        self.hyper = nn.Linear(token_dim, 2 * scales + 1, bias=False)
        nn.init.zeros_(self.hyper.weight)

    def forward(self, token: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        k = 2 * self.scales
        if regions.ndim != 5 or regions.shape[1] != k or token.shape != (regions.shape[0], self.hyper.in_features):
            raise ValueError(f"expected token [B, {self.hyper.in_features}] and regions [B, {k}, G, G, G], "
                             f"got {tuple(token.shape)} and {tuple(regions.shape)}")
        w = self.prior.to(token.dtype) + self.hyper(token)  # [B, 2S + 1]
        logits = torch.einsum("bk,bkxyz->bxyz", w[:, :k], regions.to(w.dtype)) + w[:, k, None, None, None]
        return logits[:, None]
