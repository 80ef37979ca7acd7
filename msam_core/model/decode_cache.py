"""What the decoder keeps between its passes on one embedding.

An interactive session decodes the same crop's embedding again at every click, with one click
more. Three parts of a decoder pass do not depend on the clicks, and are kept here instead of
being computed again:

- **each click's grown region** (models with ``click_regions``) depends only on the crop and the
  click's cell (:class:`~msam_core.model.click_regions.RegionCache`): each click is grown once;
- **the Mask-Enhanced Adapter's output without a mask prompt**: the adapter's inputs are then the
  image embedding and the constant ``no_mask_embed``, so its output is the same on every such
  pass. It is computed at the first one and kept;
- **the high-resolution stem's prompt-independent part** (models with ``high_res_features``): its
  features unfolded from the embedding, standardised and normalised for the click similarity,
  and the pooled crop for the click regions (:meth:`~msam_core.model.high_res.HighResStem.prepare`).

What is kept is what would be computed again, so the logits are the same, bit for bit. One
cache serves one embedding (one crop, or one batch of crops) under one decoding context (the
same autocast); it refuses another embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from msam_core.model.click_regions import RegionCache

T = TypeVar("T")


class DecodeCache:
    """Per-embedding state of :meth:`msam_core.model.msam.MSAM.decode` (see the module).

    Attributes:
        regions: each click's grown region (:class:`~msam_core.model.click_regions.RegionCache`).
    """

    def __init__(self) -> None:
        self.regions = RegionCache()
        self._embedding: torch.Tensor | None = None
        self._kept: dict[str, Any] = {}

    def kept(self, name: str, embedding: torch.Tensor, compute: Callable[[], T]) -> T:
        """The part ``name`` of a pass on ``embedding`` (the full tensor given to ``decode``):
        ``compute()`` on the first call for that name, the kept value after.

        With autograd on (training) nothing is kept and ``compute()`` runs every time: a kept
        tensor would tie the graphs of separate passes together.

        Raises:
            ValueError: ``embedding`` is not the one this cache first saw.
        """
        if torch.is_grad_enabled():
            return compute()
        if self._embedding is None:
            self._embedding = embedding
        elif embedding is not self._embedding and not (
                embedding.shape == self._embedding.shape and torch.equal(embedding, self._embedding)):
            raise ValueError(f"this DecodeCache holds another embedding's {name}; use one cache per embedding")
        if name not in self._kept:
            self._kept[name] = compute()
        return self._kept[name]
