"""msam core: the model, volume I/O and the inference pipeline. Knows nothing of HTTP or queues."""

__version__ = "0.1.0"


def load_checkpoint(*args, **kwargs):  # noqa: D103 - documented in msam_core.checkpoints
    from msam_core.checkpoints import load_checkpoint as _load

    return _load(*args, **kwargs)


load_checkpoint.__doc__ = "See :func:`msam_core.checkpoints.load_checkpoint`."
