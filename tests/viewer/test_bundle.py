"""The committed viewer bundle (api/static/viewer/) is built from the committed source (viewer/):
``make viewer`` records a digest of its inputs; recomputed here without Node.js."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "viewer"
BUNDLE = ROOT / "api" / "static" / "viewer"


def source_digest() -> str:
    files = ["build.mjs", "index.html", "package.json", "package-lock.json"]
    files += ["src/" + p.name for p in sorted((SOURCE / "src").iterdir(), key=lambda p: p.name)]
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0")
        h.update((SOURCE / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def test_bundle_is_built_from_the_current_source() -> None:
    recorded = (BUNDLE / "SOURCE_SHA256").read_text().strip()
    assert recorded == source_digest(), "viewer/ changed since the bundle was built: run `make viewer`"
    assert (BUNDLE / "index.html").read_bytes() == (SOURCE / "index.html").read_bytes()


def test_bundle_is_small_and_dependencies_pinned() -> None:
    assert (BUNDLE / "viewer.js").stat().st_size < 1_500_000  # minified, without Zarr codecs
    pkg = json.loads((SOURCE / "package.json").read_text())
    for deps in (pkg.get("dependencies", {}), pkg.get("devDependencies", {})):
        for name, version in deps.items():
            assert version[0].isdigit(), f"{name} is not pinned to an exact version: {version}"
    lock = json.loads((SOURCE / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@niivue/niivue"]["version"] == pkg["dependencies"]["@niivue/niivue"]
