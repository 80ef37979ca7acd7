"""``msam data``: the commands that build training and evaluation data (a ``msam.commands``
plugin). ``synth`` writes the synthetic data set, ``real`` the real-tumour set, ``pack`` the file
that online lesion synthesis trains from; each module adds its own sub-command here, so none of
them imports another for its command line."""

from __future__ import annotations

import argparse

from msam_train import pack, real, synth


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build training data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    synth.add_parser(data_sub)
    real.add_parser(data_sub)
    pack.add_parser(data_sub)
