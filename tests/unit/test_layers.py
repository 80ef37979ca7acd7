"""Dependencies point inward: msam_core (inference) imports neither training (msam_train) nor the
service (msam_service, api, worker); their sub-commands reach ``msam`` through the
``msam.commands`` entry points, and are found there."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTER = ("msam_train", "msam_service", "api", "worker")
TRAINING_COMMANDS = ("data", "train", "evaluate", "calibrate", "compare")


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages ``path`` imports anywhere (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_of_msam_core_names_an_outer_package_in_an_import() -> None:
    modules = sorted((ROOT / "msam_core").rglob("*.py"))
    assert len(modules) > 30
    wrong = {str(p.relative_to(ROOT)): sorted(_imported_packages(p) & set(OUTER)) for p in modules}
    assert {p: pkgs for p, pkgs in wrong.items() if pkgs} == {}


def test_importing_all_of_msam_core_and_its_cli_loads_no_outer_module() -> None:
    """Every module of msam_core imported in a fresh interpreter (the cli included; its parser,
    which loads the plugins, is not built): no module of training or the service is loaded."""
    script = ("import importlib, json, pkgutil, sys\n"
              "import msam_core, msam_core.cli\n"
              "names = [m.name for m in pkgutil.walk_packages(msam_core.__path__, 'msam_core.')]\n"
              "for name in names: importlib.import_module(name)\n"
              f"outer = sorted(m for m in sys.modules if m.split('.')[0] in {OUTER!r})\n"
              "print(json.dumps({'imported': names, 'outer': outer}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert "msam_core.cli.segment" in seen["imported"] and "msam_core.pipeline.segmenter" in seen["imported"]
    assert seen["outer"] == []


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, p in action.choices.items()}


def _runners(parser: argparse.ArgumentParser) -> set[str]:
    """The modules of the functions a command runs (``msam data`` has sub-commands of its own)."""
    subs = _subcommands(parser)
    if not subs:
        return {parser.get_default("func").__module__}
    return set().union(*map(_runners, subs.values()))


def test_the_training_commands_are_msam_train_plugins_and_msam_finds_them() -> None:
    from msam_core.cli import build_parser

    plugins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["msam.commands"]
    for command in TRAINING_COMMANDS:
        assert plugins[command].startswith("msam_train."), (command, plugins[command])
    commands = _subcommands(build_parser())
    for command in TRAINING_COMMANDS:
        parser = commands[command]
        assert not parser.get_default("unavailable"), command
        assert {m.split(".")[0] for m in _runners(parser)} == {"msam_train"}, (command, _runners(parser))
    assert _runners(commands["segment"]) == {"msam_core.cli.segment"}
    assert _runners(commands["serve"]) == {"msam_service.serve"}
