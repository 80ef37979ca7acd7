"""msam core: the model, volume I/O and the inference pipeline. Knows nothing of HTTP or queues."""

from pathlib import Path as _Path

__version__ = "0.1.0"

#: The model that ships with the package: ``msam segment``'s and the service's default
#: (``load_model(BUNDLED_CHECKPOINT)``; also importable from :mod:`msam_core.checkpoints`).
BUNDLED_CHECKPOINT = _Path(__file__).resolve().parent / "weights" / "msam_default.safetensors"


def load_checkpoint(*args, **kwargs):  # noqa: D103 - documented in msam_core.checkpoints
    from msam_core.checkpoints import load_checkpoint as _load

    return _load(*args, **kwargs)


load_checkpoint.__doc__ = "See :func:`msam_core.checkpoints.load_checkpoint`."
