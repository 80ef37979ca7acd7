"""The training loss, in plain torch: MONAI's ``DiceCELoss(sigmoid=True, squared_pred=True)``.

The recipe's loss (M-SAM's) is MONAI's Dice + cross-entropy for one sigmoid channel. Training
on a lent accelerator must run with what its image has (torch, numpy, scipy; no MONAI), so the
same arithmetic is written out here and tested against MONAI (tests/unit/train/test_online.py):

- Dice: per sample and channel, ``1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5)`` with
  ``p = sigmoid(logits)``, averaged over samples and channels;
- cross-entropy: ``BCEWithLogitsLoss`` averaged over every voxel;
- the loss is their sum.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

SMOOTH = 1e-5


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits``, ``target``: ``[B, 1, D, H, W]`` (target 0/1); returns a scalar."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have one shape")
    target = target.to(logits.dtype)
    p = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    intersection = (p * target).sum(dims)
    denominator = (p * p).sum(dims) + (target * target).sum(dims)
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)
