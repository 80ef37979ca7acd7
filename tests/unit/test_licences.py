"""Licences of what msam ships: the runtime set is listed with pip-licenses and judged by
licence-policy.toml; THIRD_PARTY_LICENSES is what this module generates; the images carry it.

The runtime set is computed, not written down: msam's dependencies without extras (pyproject.toml),
followed transitively through the installed metadata (markers evaluated, extras such as
``celery[redis]`` followed), and it must be exactly requirements.lock, name for name and version
for version. So the licences judged are those of the locked set the images install.

Regenerate the notices after a lock change with ``make notices`` (that is
``python -m tests.unit.test_licences --write``).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
POLICY = ROOT / "licence-policy.toml"
NOTICES = ROOT / "THIRD_PARTY_LICENSES"
DOCKERFILES = [ROOT / "deploy" / "docker" / n for n in ("api.Dockerfile", "worker.Dockerfile")]
NOTICES_IN_IMAGE = "/usr/share/doc/msam/THIRD_PARTY_LICENSES"

_COPYLEFT = re.compile(r"\b(A|L)?GPL|General Public Licen[cs]e", re.I)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """``name==version`` lines of a pip-compile lock (comments, options and annotations skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def runtime_set() -> dict[str, str]:
    """The installed distributions msam needs at run time: canonical name -> version. The roots are
    pyproject.toml's [project] dependencies (not msam's installed metadata, which a stale
    msam.egg-info in the checkout could shadow); from there, each installed distribution's own."""
    found: dict[str, str] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    roots = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [(r.name, frozenset(r.extras)) for r in map(Requirement, roots)]
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in done:
            continue
        done.add((canonical(name), extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pytest.fail(f"{name} is required at run time but not installed: run `make install`")
        found[canonical(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(found.items()))


@cache
def policy() -> dict:
    return tomllib.loads(POLICY.read_text())


# -- judging a licence string ---------------------------------------------------------------------

def _spdx_ok(expr: str, accepted: set[str]) -> bool:
    """An SPDX expression (AND, OR, WITH, parentheses) against the accepted identifiers."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expr)
    pos = 0

    def parse_or() -> bool:
        nonlocal pos
        ok = parse_and()
        while pos < len(tokens) and tokens[pos].upper() == "OR":
            pos += 1
            ok = parse_and() or ok
        return ok

    def parse_and() -> bool:
        nonlocal pos
        ok = parse_atom()
        while pos < len(tokens) and tokens[pos].upper() == "AND":
            pos += 1
            ok = parse_atom() and ok
        return ok

    def parse_atom() -> bool:
        nonlocal pos
        if pos >= len(tokens):
            return False
        if tokens[pos] == "(":
            pos += 1
            ok = parse_or()
            pos += 1  # ")"
            return ok
        ident = tokens[pos]
        pos += 1
        if pos < len(tokens) and tokens[pos].upper() == "WITH":
            pos += 2  # an exception only grants more than the licence it qualifies
        return ident in accepted

    ok = parse_or()
    return ok and pos == len(tokens)


def judge(licence: str, accepted: set[str] | None = None) -> str:
    """``"ok"``, ``"copyleft"`` (GPL, AGPL, LGPL anywhere in it) or ``"unknown"`` (anything else not
    accepted, an empty or UNKNOWN licence included)."""
    accepted = set(policy()["policy"]["permissive"]) if accepted is None else accepted
    parts = [p.strip() for p in licence.split(";") if p.strip()]
    ok = bool(parts) and all(
        p in accepted or (re.search(r"\s(AND|OR|WITH)\s|\(", p) is not None and _spdx_ok(p, accepted)) for p in parts
    )
    if ok:
        return "ok"
    return "copyleft" if _COPYLEFT.search(licence) else "unknown"


# -- pip-licenses ---------------------------------------------------------------------------------

@cache
def pip_licenses() -> dict[str, dict]:
    """pip-licenses' record (Name, Version, License, URL) of each runtime package, by canonical name."""
    names = list(runtime_set())
    out = subprocess.run(
        [sys.executable, "-m", "piplicenses", "--from=mixed", "--with-system", "--with-urls", "--format=json",
         "--packages", *names],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return {canonical(r["Name"]): r for r in json.loads(out.stdout)}


def _licence_files(dist: md.Distribution) -> list[md.PackagePath]:
    """A distribution's licence files: its License-File entries (PEP 639 puts them under
    .dist-info/licenses/) and, for older wheels, LICENSE/COPYING/NOTICE files in .dist-info."""
    named = {f"licenses/{n}" for n in dist.metadata.get_all("License-File") or []} | set(dist.metadata.get_all("License-File") or [])
    files = []
    for f in dist.files or []:
        parts = f.parts
        if not parts or not parts[0].endswith(".dist-info"):
            continue
        rel = "/".join(parts[1:])
        if rel in named or parts[1] == "licenses" or (
                len(parts) == 2 and re.match(r"(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", parts[1], re.I)):
            files.append(f)
    return sorted(files, key=str)


def _text(path: md.PackagePath) -> str:
    return Path(path.locate()).read_bytes().decode("utf-8", errors="replace")


def render_notices() -> str:
    """THIRD_PARTY_LICENSES: every runtime package with its licence (pip-licenses), URL and the text
    of each licence file its wheel carries, then the texts licence-policy.toml adds for components
    bundled in wheels that do not carry them. Deterministic: sorted, no dates."""
    runtime, records = runtime_set(), pip_licenses()
    out = [
        "Third-party software in msam's images and runtime environment",
        "=" * 62,
        "",
        "msam is licensed under Apache-2.0. It ships the Python packages below: the runtime set of",
        "requirements.lock (torch as its CPU build; the worker image installs the CUDA build of the same",
        "version, with NVIDIA's nvidia-* wheels under their own licences). Generated by `make notices`",
        "from the installed packages' metadata (pip-licenses) and licence-policy.toml; do not edit.",
        "",
        f"{len(runtime)} packages:",
        "",
    ]
    width = max(len(n) for n in runtime) + 2
    for name, version in runtime.items():
        out.append(f"  {name.ljust(width)}{version.ljust(20)}{records[name]['License']}")
    for name, version in runtime.items():
        dist = md.distribution(name)
        out += ["", "", "-" * 100, f"{name} {version}", f"Licence: {records[name]['License']}",
                f"URL: {records[name].get('URL', 'UNKNOWN')}", "-" * 100]
        files = _licence_files(dist)
        if not files:
            later = any(canonical(b["package"]) == name and b.get("text") for b in policy()["bundled"])
            out += ["", "(the wheel carries no licence file" + (": its texts are at the end of this file)" if later else ")")]
        for f in files:
            text = _text(f).replace("\r\n", "\n").rstrip()
            out += ["", f"--- {'/'.join(f.parts[1:])} ---", "", text]
    bundled = [b for b in policy()["bundled"] if b.get("text")]
    if bundled:
        out += ["", "", "=" * 100, "Components bundled inside the wheels above whose licence texts the wheels do not carry",
                "=" * 100]
        for b in bundled:
            out += ["", "", "-" * 100, f"{b['component']} (in {b['package']} {runtime[canonical(b['package'])]})",
                    f"Licence: {b['licence']}", "-" * 100, "", b["text"].rstrip()]
    return "\n".join(out) + "\n"


# -- tests ----------------------------------------------------------------------------------------

def test_runtime_set_is_the_lock() -> None:
    """What the licence check judges is what the images install: msam's runtime closure, as
    installed here, is requirements.lock exactly (no package more or less, same versions)."""
    runtime, locked = runtime_set(), lock_pins()
    assert set(runtime) == set(locked), (
        f"installed runtime set vs requirements.lock: only installed {sorted(set(runtime) - set(locked))}, "
        f"only locked {sorted(set(locked) - set(runtime))} (run `make lock`, then `make install`)")
    assert runtime == locked, {n: (runtime[n], locked[n]) for n in runtime if runtime[n] != locked[n]}


def test_no_gpl_or_unknown_licence_in_the_runtime_set() -> None:
    records = pip_licenses()
    runtime = runtime_set()
    assert set(records) == set(runtime), f"pip-licenses did not list {sorted(set(runtime) - set(records))}"
    allow = {canonical(k): v for k, v in policy().get("allow", {}).items()}
    refused, allowed, counts = [], [], {}
    for name, rec in sorted(records.items()):
        licence, verdict = rec["License"], judge(rec["License"])
        counts[licence] = counts.get(licence, 0) + 1
        if verdict == "ok":
            continue
        entry = allow.get(name)
        if entry and entry.get("licence") == licence and entry.get("reason", "").strip():
            allowed.append(f"{name} {rec['Version']}: {licence}")
        else:
            refused.append(f"{name} {rec['Version']}: {licence} ({verdict})")
    print(f"\n{len(records)} runtime packages; licences: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    print("allowed after review (licence-policy.toml):", "; ".join(allowed) or "none")
    assert not refused, ("licences refused in the runtime set (review them and add an [allow] entry with the "
                         "reason to licence-policy.toml, or drop the package):\n" + "\n".join(refused))


@pytest.mark.parametrize(
    ("licence", "verdict"),
    [
        # pylibjpeg-libjpeg 2.5.0's own metadata, the package this check was written to keep out
        ("GNU General Public License v3 (GPLv3); Other/Proprietary License", "copyleft"),
        ("GPL-3.0-or-later WITH GCC-exception-3.1", "copyleft"),
        ("AGPL-3.0-only", "copyleft"),
        ("LGPL-2.1-or-later", "copyleft"),
        ("GNU Lesser General Public License v2 or later (LGPLv2+)", "copyleft"),
        ("MIT AND GPL-2.0-only", "copyleft"),
        ("UNKNOWN", "unknown"),
        ("", "unknown"),
        ("Other/Proprietary License", "unknown"),
        ("Mozilla Public License 2.0 (MPL 2.0)", "unknown"),
        ("MIT OR", "unknown"),
        ("MIT", "ok"),
        ("Apache Software License; BSD License", "ok"),
        ("Apache-2.0 OR BSD-2-Clause", "ok"),
        ("GPL-2.0-only OR MIT", "ok"),
        ("(MIT OR GPL-2.0-only) AND BSD-3-Clause", "ok"),
        ("Apache-2.0 AND Apache-2.0 WITH LLVM-exception AND BSD-2-Clause AND BSD-3-Clause AND BSL-1.0 AND MIT", "ok"),
    ],
)
def test_the_policy_refuses_gpl_and_unknown_licences(licence: str, verdict: str) -> None:
    assert judge(licence) == verdict


def test_allow_list_entries_are_reviewed_and_current() -> None:
    records = pip_licenses()
    for name, entry in policy().get("allow", {}).items():
        assert entry.get("reason", "").strip(), f"[allow.{name}] has no reason"
        rec = records.get(canonical(name))
        assert rec is not None, f"[allow.{name}]: {name} is no longer in the runtime set; remove the entry"
        assert rec["License"] == entry["licence"], (
            f"[allow.{name}]: reviewed licence {entry['licence']!r}, now {rec['License']!r}: review again")
        assert judge(rec["License"]) != "ok", f"[allow.{name}]: {rec['License']!r} needs no entry"


def test_bundled_copyleft_components_are_reviewed() -> None:
    """numpy and scipy list what their wheels bundle as 'License: ...' lines in their licence file;
    each GPL-family one needs a [[bundled]] entry with its reason, and each entry must still match
    installed files of its package."""
    runtime = runtime_set()
    entries = policy()["bundled"]
    reviewed = {(canonical(b["package"]), b["licence"]) for b in entries}
    found = set()
    for name in runtime:
        for f in _licence_files(md.distribution(name)):
            for m in re.finditer(r"^License:\s*(.+?)\s*$", _text(f), re.M):
                if _COPYLEFT.search(m.group(1)):
                    found.add((name, m.group(1)))
    assert found - reviewed == set(), f"bundled copyleft components without review: {sorted(found - reviewed)}"
    for b in entries:
        name = canonical(b["package"])
        assert name in runtime, f"[[bundled]] {b['component']}: {b['package']} is not in the runtime set"
        assert b.get("reason", "").strip(), f"[[bundled]] {b['component']} has no reason"
        files = [str(f) for f in md.distribution(name).files or []]
        assert any(fnmatch.fnmatch(f, b["files"]) for f in files), (
            f"[[bundled]] {b['component']}: no file of {b['package']} matches {b['files']}; the wheel changed")


def test_third_party_licenses_is_current() -> None:
    assert NOTICES.exists(), "THIRD_PARTY_LICENSES is missing: run `make notices`"
    expected = render_notices()
    assert NOTICES.read_text() == expected, "THIRD_PARTY_LICENSES is out of date: run `make notices`"
    for name, version in runtime_set().items():  # and it names every runtime package at its version
        assert re.search(rf"^{re.escape(name)} {re.escape(version)}$", expected, re.M), name


def test_the_images_carry_the_notices() -> None:
    """Both images copy THIRD_PARTY_LICENSES into their final stage."""
    for path in DOCKERFILES:
        text = re.sub(r"\\\n", " ", path.read_text())
        final_stage = re.split(r"^FROM ", text, flags=re.M)[-1]
        copies = [line for line in final_stage.splitlines() if line.startswith("COPY") and "THIRD_PARTY_LICENSES" in line]
        assert copies and all(line.split()[-1] == NOTICES_IN_IMAGE for line in copies), (path.name, copies)


if __name__ == "__main__":  # `make notices`
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.unit.test_licences --write")
    NOTICES.write_text(render_notices())
    print(f"{NOTICES.name}: {len(runtime_set())} packages, {NOTICES.stat().st_size} bytes")
