"""The ``msam`` command line. Each sub-command lives in its own module and registers itself here.

Exit codes: 0 success, 2 a user mistake (the message says what to fix), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys

from msam_core.errors import MsamError

# Sub-command modules: each has ``register(subparsers)`` that adds its parser and sets ``func``.
_COMMANDS = ("msam_core.cli.convert", "msam_core.cli.segment", "msam_core.train.synth",
             "msam_core.train.trainer", "msam_core.train.evaluate", "msam_core.train.calibrate",
             "msam_core.train.compare")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="msam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    _register_plugins(sub)
    return parser


def _register_plugins(sub: argparse._SubParsersAction) -> None:
    """Sub-commands other installed packages add (entry point group ``msam.commands``, e.g.
    ``msam serve`` from the service), so msam_core never imports them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="msam.commands"):
        try:
            register = ep.load()
        except ImportError:  # an optional part that is not installed here
            continue
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MsamError as exc:
        print(f"msam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be written, a full disk, ...: the reason, not a traceback
        print(f"msam {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
