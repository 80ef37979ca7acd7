"""The ``msam`` command line. Each sub-command lives in its own module and registers itself here.

Exit codes: 0 success, 2 a user mistake (the message says what to fix), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys

from msam_core.errors import MsamError

# Sub-command modules: each has ``register(subparsers)`` that adds its parser and sets ``func``.
_COMMANDS = ("msam_core.cli.convert", "msam_core.cli.segment")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="msam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MsamError as exc:
        print(f"msam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
