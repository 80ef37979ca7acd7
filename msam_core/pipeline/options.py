"""The pipeline's own settings: what happens around the network, apart from its architecture.

A checkpoint holds two objects: the network's architecture (:class:`~msam_core.model.ModelConfig`,
which decides the weights' shapes) and these options, which the network never sees (the decision
threshold, the stable-region prior, the boundary refinement, the coarse view). They are chosen on
validation data after training (``msam calibrate``), stored in the checkpoint's metadata beside the
config (:mod:`msam_core.checkpoints`), read once by the loader and handed to the
:class:`~msam_core.pipeline.segmenter.Segmenter` explicitly. Every caller (``msam segment``, the
worker, ``msam evaluate``, ``msam calibrate``) builds its ``Segmenter`` from the same pair, so the
masks a user gets are the masks that were measured.

A new pipeline step adds its field here, is applied in one place of the ``Segmenter``, and is
calibrated by ``msam calibrate``; 0 / off must mean "the pipeline without it".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from msam_core.pipeline.region_prior import MAX_VOXELS, one_positive_click


@dataclass(frozen=True)
class PipelineOptions:
    """Settings of the steps around the network (all off by default: SAM-Med3D's pipeline).

    Attributes:
        mask_threshold: the logit at which a voxel counts as lesion (SAM's ``mask_threshold``).
            The :class:`~msam_core.pipeline.segmenter.Segmenter` returns the network's logits
            minus it and shifts a mask prompt back before the network sees it, so ``> 0`` stays
            the decision everywhere downstream.
        prior_weight_first: weight of the stable-region prior
            (:mod:`~msam_core.pipeline.region_prior`) for a lesion prompted by one positive click.
        prior_weight: the same after further clicks.
        prior_max_voxels: largest stable region (voxels at 1.5 mm) the prior may take; the bound
            the weights were chosen at.
        boundary_band_first: half-width (voxels) of the band in which a random walker moves the
            boundary onto the image's edges (:mod:`~msam_core.pipeline.boundary`), for a lesion
            prompted by one positive click; 0 = off.
        boundary_band: the same after further clicks.
        coarse_view: also look at twice the spacing and keep, per click, the candidate mask the
            image supports better (:mod:`~msam_core.pipeline.coarse_view`).
    """

    mask_threshold: float = 0.0
    prior_weight_first: float = 0.0
    prior_weight: float = 0.0
    prior_max_voxels: int = MAX_VOXELS
    boundary_band_first: int = 0
    boundary_band: int = 0
    coarse_view: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.coarse_view, bool):
            raise ValueError(f"coarse_view must be true or false, got {self.coarse_view!r}")
        if not _number(self.mask_threshold) or not math.isfinite(self.mask_threshold):
            raise ValueError(f"mask_threshold must be a finite logit, got {self.mask_threshold!r}")
        for name in ("prior_weight_first", "prior_weight"):
            value = getattr(self, name)
            if not (_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite weight >= 0, got {value!r}")
        if not _whole(self.prior_max_voxels) or self.prior_max_voxels < 1:
            raise ValueError(f"prior_max_voxels must be a whole number of voxels >= 1, got {self.prior_max_voxels!r}")
        for name in ("boundary_band_first", "boundary_band"):
            value = getattr(self, name)
            if not _whole(value) or value < 0:
                raise ValueError(f"{name} must be a whole number of voxels >= 0, got {value!r}")

    def prior_weight_for(self, labels: np.ndarray) -> float:
        """The prior weight for a lesion's clicks (``labels``: 1 positive / 0 negative):
        ``prior_weight_first`` when they are one positive click, else ``prior_weight``."""
        return float(self.prior_weight_first if one_positive_click(labels) else self.prior_weight)

    def boundary_band_for(self, labels: np.ndarray) -> int:
        """The boundary band for a lesion's clicks, chosen as :meth:`prior_weight_for` chooses."""
        return int(self.boundary_band_first if one_positive_click(labels) else self.boundary_band)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineOptions":
        """Options from a checkpoint's metadata; an unknown field raises ``ValueError`` (a file
        written by a newer msam), a missing one takes its default (off)."""
        unknown = set(d) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown pipeline option fields: {sorted(unknown)}")
        return cls(**d)


#: The option names, as stored in a checkpoint's ``pipeline`` metadata.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PipelineOptions))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
