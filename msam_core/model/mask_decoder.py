"""SAM-Med3D's mask decoder: two-way transformer, hypernetwork heads, 4x upscaling to 32^3 logits.

Names follow upstream's ``MaskDecoder3D`` (``transformer``, ``iou_token``, ``mask_tokens``,
``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``).
"""

from __future__ import annotations

import torch
from torch import nn

from msam_core.model.common import MLP, LayerNorm3d
from msam_core.model.transformer import TwoWayTransformer


class MaskDecoder3D(nn.Module):
    """``src [B, E, 8, 8, 8]`` (image embedding already fused with the mask prompt),
    ``image_pe [1, E, 8, 8, 8]``, ``sparse [B, T, E]`` -> ``(masks [B, 4, 32, 32, 32], iou [B, 4])``.

    Mask 0 is the single-mask output SAM-Med3D and M-SAM use; 1..3 are the multimask outputs.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(transformer_depth, transformer_dim, transformer_heads, transformer_mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self, src: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, high_res: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``high_res [B, E/8, 32, 32, 32]`` (optional, :mod:`msam_core.model.high_res`): image
        features added to the upscaled embedding before its last activation, as SAM 2 does."""
        masks, iou, _ = self.predict(src, image_pe, sparse, high_res)
        return masks, iou

    def predict(
        self, src: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, high_res: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`, plus the mask tokens after the transformer ``[B, 4, E]`` (for heads
        that weight other inputs per prompt, :mod:`msam_core.model.region_logits`)."""
        b, c, x, y, z = src.shape
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        pos = image_pe.expand(b, -1, -1, -1, -1)
        hs, keys = self.transformer(src, pos, tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        grid = keys.transpose(1, 2).reshape(b, c, x, y, z)
        if high_res is None:
            upscaled = self.output_upscaling(grid)
        else:
            *stages, act = self.output_upscaling
            for stage in stages:
                grid = stage(grid)
            upscaled = act(grid + high_res.to(grid.dtype))
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, c_up, *size = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c_up, -1)).reshape(b, -1, *size)
        return masks, self.iou_prediction_head(iou_out), mask_out
