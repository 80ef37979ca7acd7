"""Low-rank adaptation (LoRA) of the query and value projections of the frozen image encoder.

M-SAM adds ``B_q A_q x`` to the queries and ``B_v A_v x`` to the values of every encoder block
(rank 4, no bias). ``B`` starts at zero, so a freshly added LoRA leaves the encoder unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRAQV(nn.Module):
    """Rank-``r`` updates for q and v: ``x [..., dim] -> (dq [..., dim], dv [..., dim])``."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank = rank
        self.a_q = nn.Linear(dim, rank, bias=False)
        self.b_q = nn.Linear(rank, dim, bias=False)
        self.a_v = nn.Linear(dim, rank, bias=False)
        self.b_v = nn.Linear(rank, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a in (self.a_q, self.a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.b_q, self.b_v):
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b_q(self.a_q(x)), self.b_v(self.a_v(x))
