"""argparse value types shared by the ``msam`` commands.

A value out of range is refused while the command line is parsed, before any data is read or any
model is loaded: argparse prints the usage and the message below and exits with code 2 (a user
mistake, as every ``msam`` command). Each message names what was expected and what was given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from msam_core.errors import UnsupportedRequest


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
        return value

    return parse


def number(minimum: float = 0.0, exclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number ``>= minimum`` (``> minimum`` when ``exclusive``)."""
    bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    return parse


def probability(text: str) -> float:
    """An argparse type: a probability in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def require_device(device: str | None) -> str | None:
    """``device`` (``cpu``, ``cuda``, ``auto``; ``None`` for a command without ``--device``) when it
    can run here; ``cuda`` without a CUDA GPU raises :class:`UnsupportedRequest` before any work
    starts (torch would fail later, mid-run). ``msam``'s ``main`` checks every command with it."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedRequest("--device cuda: no CUDA GPU is available here; use --device cpu")
    return device
