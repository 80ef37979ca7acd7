"""pyproject.toml declares ranges, the lock files pin the exact set.

* requirements.lock: the runtime set, inference and the service (torch's CPU build included); the
  worker image and the install tests use it; what only training needs (the train extra) is not in it;
* requirements-dev.lock: the same versions plus the train and test extras; ``make install`` syncs
  .venv to it;
* requirements-api.lock: the same versions, torch-free (the runtime dependencies minus the model
  stack); the API image installs it.

The locks are pip-compile's output (``make lock``), never edited by hand: the slow test runs
``make lock`` on a copy and requires the same files back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("requirements.lock", "requirements-dev.lock", "requirements-api.lock")
MODEL_STACK = {"torch", "safetensors"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            out[canonical(m.group(1))] = m.group(2)
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_declares_ranges_that_the_lock_satisfies() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    for group, reqs, locked in (("dependencies", project()["dependencies"], runtime),
                                ("train", project()["optional-dependencies"]["train"], dev),
                                ("test", project()["optional-dependencies"]["test"], dev)):
        for text in reqs:
            req = Requirement(text)
            assert not any(s.operator in ("==", "===") for s in req.specifier), f"{group}: {text} is pinned, declare a range"
            lower = [s for s in req.specifier if s.operator == ">="]
            assert lower, f"{group}: {text} has no tested lower bound"
            name = canonical(req.name)
            assert name in locked, f"{group}: {req.name} is not in the lock: run `make lock`"
            assert req.specifier.contains(locked[name], prereleases=True), (
                f"{group}: the lock's {req.name}=={locked[name]} is outside {text}: run `make lock`")


def test_the_three_locks_agree() -> None:
    runtime, dev, api = pins("requirements.lock"), pins("requirements-dev.lock"), pins("requirements-api.lock")
    assert {n: dev.get(n) for n in runtime} == runtime, "requirements-dev.lock disagrees with requirements.lock"
    assert {n: runtime.get(n) for n in api} == api, "requirements-api.lock has versions requirements.lock lacks"
    direct = {canonical(Requirement(r).name) for r in project()["dependencies"]}
    assert direct - MODEL_STACK <= set(api), f"missing from the API lock: {sorted(direct - MODEL_STACK - set(api))}"
    assert not MODEL_STACK & set(api), "the API lock must stay torch-free"
    assert {"sympy", "filelock"} & set(api) == set(), "torch's own dependencies leaked into the API lock"


def test_what_only_training_needs_is_in_the_dev_lock_only() -> None:
    """The train extra (msam_train's own dependencies) is installed by ``make install``, never by
    the images: requirements.lock and requirements-api.lock lack it."""
    runtime, dev, api = pins("requirements.lock"), pins("requirements-dev.lock"), pins("requirements-api.lock")
    direct = {canonical(Requirement(r).name) for r in project()["dependencies"]}
    train_only = {canonical(Requirement(r).name) for r in project()["optional-dependencies"]["train"]} - direct
    assert train_only, "the train extra declares nothing beyond the runtime set"
    assert train_only <= set(dev), f"missing from requirements-dev.lock: {sorted(train_only - set(dev))}"
    assert not train_only & set(runtime), f"training's packages in requirements.lock: {sorted(train_only & set(runtime))}"
    assert not train_only & set(api), f"training's packages in requirements-api.lock: {sorted(train_only & set(api))}"


def test_the_lock_holds_torchs_cpu_build_and_nothing_of_cuda() -> None:
    for name in LOCKS:
        locked = pins(name)
        cuda = sorted(n for n in locked if n.startswith(("nvidia-", "triton", "cuda-")))
        assert not cuda, f"{name} pins CUDA packages {cuda}: torch resolved to a CUDA build"
    assert pins("requirements.lock")["torch"].endswith("+cpu")


def test_install_and_images_use_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M)
    assert stamp and "requirements-dev.lock" in stamp.group(1).split(), "make install must rebuild when the lock changes"
    recipe = makefile[stamp.end():].split("\n\n")[0]
    assert "pip-sync" in recipe and "requirements-dev.lock" in recipe and "--no-deps -e ." in recipe
    api = (ROOT / "deploy" / "docker" / "api.Dockerfile").read_text()
    assert re.search(r"pip install [^\n]*-r requirements-api\.lock", api)
    worker = (ROOT / "deploy" / "docker" / "worker.Dockerfile").read_text()
    assert "requirements.lock" in worker and re.search(r"pip install [^\n]*-r /tmp/requirements\.txt", worker)


@pytest.mark.slow
def test_the_locks_are_what_make_lock_makes(tmp_path: Path) -> None:
    """`make lock` on a copy of pyproject.toml, Makefile and the locks gives the same files back:
    the locks are pip-compile's, current with pyproject.toml. Needs PyPI (pip-compile resolves)."""
    for name in ("pyproject.toml", "Makefile", *LOCKS):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = Path(sys.prefix)
    assert (venv / "bin" / "pip-compile").exists(), "pip-tools is not installed: run `make install`"
    out = subprocess.run(["make", "-C", str(tmp_path), "lock", f"VENV={venv}"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in LOCKS:
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), f"{name} differs from `make lock`'s"
