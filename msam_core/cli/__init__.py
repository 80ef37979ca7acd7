"""The ``msam`` command line. Each sub-command lives in its own module and registers itself here.

Exit codes: 0 success, 2 a user mistake (the message says what to fix), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from msam_core.cli.arguments import require_device
from msam_core.errors import MsamError, UnsupportedRequest

# Sub-command -> its module, which has ``register(subparsers)`` that adds the parser and sets ``func``.
# The other sub-commands (training and evaluation, the service) are plugins: see _register_plugins.
_COMMANDS = {"convert": "msam_core.cli.convert", "segment": "msam_core.cli.segment"}
#: A missing module of these is a bug, never "unavailable here".
_OWN_PACKAGES = {"msam_core", "msam_service", "api", "worker"}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="msam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, name in _COMMANDS.items():
        _register(sub, command, name, lambda name=name: importlib.import_module(name).register)
    _register_plugins(sub)
    return parser


def _register(sub: argparse._SubParsersAction, command: str, module: str, load: Callable[[], Callable]) -> None:
    """Add ``command`` with the ``register`` function ``load()`` returns; where ``module`` needs a
    package this installation lacks (e.g. the API image, which installs no torch; the worker
    image, which installs no training), the command stays listed as unavailable."""
    try:
        register = load()
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        package = module.split(".")[0]
        if missing != package and missing.split(".")[0] in _OWN_PACKAGES | {package}:
            raise  # our own code is broken: a traceback, not "unavailable"
        _register_unavailable(sub, command, missing)
        return
    register(sub)


def _register_unavailable(sub: argparse._SubParsersAction, command: str, missing: str) -> None:
    """A sub-command whose module needs a package this installation lacks: it stays listed, and
    running it says what is missing (exit code 2) - the other commands still work."""
    p = sub.add_parser(command, help=f"(unavailable here: needs the package {missing!r})", add_help=False)

    def unavailable(args: argparse.Namespace) -> int:
        raise UnsupportedRequest(f"this command needs the Python package {missing!r}, which this installation "
                                 "lacks (the API image installs no torch, the worker image no training); run it "
                                 "where msam is fully installed (make install)")

    p.set_defaults(func=unavailable, unavailable=True)  # main() then ignores the command's own arguments


def _register_plugins(sub: argparse._SubParsersAction) -> None:
    """Sub-commands other packages add (entry point group ``msam.commands``: ``msam serve`` from
    the service, ``msam train`` and the other training and evaluation commands from msam_train),
    so msam_core never imports them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="msam.commands"):
        _register(sub, ep.name, ep.module, ep.load)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        require_device(getattr(args, "device", None))  # every command with --device, before any work
        return int(args.func(args) or 0)
    except MsamError as exc:
        print(f"msam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be written, a full disk, ...: the reason, not a traceback
        print(f"msam {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
