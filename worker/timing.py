"""Stage timing around the network, and cooperative cancellation between network calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class TimedModel:
    """Wraps a :class:`~msam_core.pipeline.segmenter.PromptableModel`: counts and times
    ``encode`` and ``decode``/``refine``; calls ``check()`` before each (raises to stop a job)."""

    def __init__(self, model: Any, check: Callable[[], None] = lambda: None) -> None:
        self.model = model
        self.img_size: int = int(model.img_size)
        self.model_id: str = str(model.model_id)
        self.check = check
        self.encode_s = 0.0
        self.decode_s = 0.0
        self.encoder_runs = 0

    def autocast(self):
        return self.model.autocast()

    def _sync(self, t: torch.Tensor) -> None:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.check()
        start = time.perf_counter()
        out = self.model.encode(image)
        self._sync(out)
        self.encode_s += time.perf_counter() - start
        self.encoder_runs += 1
        return out

    def decode(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        self.check()
        start = time.perf_counter()
        out = self.model.decode(embedding, points, labels, mask_logits)
        self._sync(out)
        self.decode_s += time.perf_counter() - start
        return out

    def refine(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None, iterations: int = 1) -> torch.Tensor:
        self.check()
        start = time.perf_counter()
        out = self.model.refine(embedding, points, labels, mask_logits, iterations=iterations)
        self._sync(out)
        self.decode_s += time.perf_counter() - start
        return out
