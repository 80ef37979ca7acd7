"""Training and evaluation of msam's models, apart from the inference library.

Depends on :mod:`msam_core` (the one inference path: ``msam evaluate`` and ``msam calibrate`` run
the same :class:`msam_core.pipeline.Segmenter` as the worker and ``msam segment``); msam_core never
imports it. Its sub-commands (``msam data|train|evaluate|calibrate|compare``) reach the ``msam``
command line through the ``msam.commands`` entry points; what only they need is the ``train``
extra (``pip install 'msam[train]'``).
"""
