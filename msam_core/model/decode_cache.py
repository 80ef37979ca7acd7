"""What the decoder keeps between its passes on one embedding.

An interactive session decodes the same crop's embedding again at every click, with one click
more. Two parts of a decoder pass do not depend on the clicks, and are kept here instead of
being computed again:

- **each click's grown region** (models with ``click_regions``) depends only on the crop and the
  click's cell (:class:`~msam_core.model.click_regions.RegionCache`): each click is grown once;
- **the Mask-Enhanced Adapter's output without a mask prompt**: the adapter's inputs are then the
  image embedding and the constant ``no_mask_embed``, so its output is the same on every such
  pass. It is computed at the first one and kept.

What is kept is what would be computed again, so the logits are the same, bit for bit. One
cache serves one embedding (one crop, or one batch of crops) under one decoding context (the
same autocast); it refuses another embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from msam_core.model.click_regions import RegionCache


class DecodeCache:
    """Per-embedding state of :meth:`msam_core.model.msam.MSAM.decode` (see the module).

    Attributes:
        regions: each click's grown region (:class:`~msam_core.model.click_regions.RegionCache`).
    """

    def __init__(self) -> None:
        self.regions = RegionCache()
        self._embedding: torch.Tensor | None = None
        self._adapted: torch.Tensor | None = None

    def adapted(self, embedding: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The adapter's output without a mask prompt for ``embedding`` (the full tensor given
        to ``decode``): ``compute()`` on the first call, the kept tensor after.

        With autograd on (training) nothing is kept and ``compute()`` runs every time: a kept
        tensor would tie the graphs of separate passes together.

        Raises:
            ValueError: ``embedding`` is not the one this cache first saw.
        """
        if torch.is_grad_enabled():
            return compute()
        if self._embedding is None:
            self._embedding, self._adapted = embedding, compute()
        elif embedding is not self._embedding and not (
                embedding.shape == self._embedding.shape and torch.equal(embedding, self._embedding)):
            raise ValueError("this DecodeCache holds another embedding's adapter output; use one cache per embedding")
        assert self._adapted is not None
        return self._adapted
