"""Podman on this machine for the container tests: the settings it needs here, the stand-in base
images, and the builds of msam's images with this machine's pip configuration.

Everything machine-specific stays outside the repository and outside the Dockerfiles (whose
public bases, python:3.11-slim and redis:7.4-alpine, are what users build on):

- a private ``containers.conf`` (``CONTAINERS_CONF``) with runc, the cgroupfs manager and lowered
  ulimits: crun fails on this kernel's cgroup v1 setup, and the default ulimits exceed the limits
  runc may set here;
- no registry is reachable, so ``python:3.11-slim`` is a stand-in: Debian 12 (Python 3.11) from
  ``debootstrap``, imported with ``podman import``; ``redis:7.4-alpine`` is that image plus
  Debian's redis-server. Both are labelled ``org.msam.stand-in`` and cached in podman's storage;
  the rootfs is cached in ``CACHE`` and rebuilt only when missing;
- builds mount the machine's pip configuration (``pip config list``: the CA bundle of the
  TLS-intercepting proxy, find-links and file indexes holding the CPU build of torch) read-only
  at the same paths, so the images install what ``make install`` installs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MSAM_IMAGES_CACHE", Path.home() / ".cache" / "msam-images"))
STAND_IN_LABEL = "org.msam.stand-in"
BASE = "python:3.11-slim"
REDIS = "redis:7.4-alpine"
API_IMAGE = "msam-api:latest"
WORKER_CPU_IMAGE = "msam-worker-cpu:latest"
PODMAN_COMPOSE = os.environ.get("MSAM_PODMAN_COMPOSE", "/opt/msam-tools/podman-compose/bin/podman-compose")
DEBIAN_MIRROR = os.environ.get("MSAM_DEBIAN_MIRROR", "http://deb.debian.org/debian")

CONTAINERS_CONF = """\
# podman settings for msam's container tests (tests/containers/podman.py writes this file)
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[engine.runtimes]
runc = ["/usr/sbin/runc"]
"""

# The official image builds redis-server with protected mode off (containers reach it over their
# network, not loopback); Debian's keeps it on, so the stand-in's redis-server turns it off.
REDIS_CONTAINERFILE = f"""\
FROM {BASE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data \\
 && printf '#!/bin/sh\\nexec /usr/bin/redis-server "$@" --protected-mode no\\n' > /usr/local/bin/redis-server \\
 && chmod 755 /usr/local/bin/redis-server
WORKDIR /data
LABEL {STAND_IN_LABEL}="debian-bookworm redis-server"
CMD ["redis-server"]
"""

# podman run failing with these words means the kernel (or its sandbox) refuses namespaces
_KERNEL_REFUSES = re.compile(r"(unshare|clone|mount|pivot_root|sethostname|newuidmap)"
                             r".*(operation not permitted|permission denied)", re.I)


class KernelRefusesContainers(RuntimeError):
    """The kernel does not let podman create a container (namespaces refused)."""


def conf_path() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "containers.conf"
    if not path.is_file() or path.read_text() != CONTAINERS_CONF:
        path.write_text(CONTAINERS_CONF)
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(conf_path()), **extra}


def podman(*args: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    exe = shutil.which("podman")
    if exe is None:
        raise RuntimeError("podman is not installed: run `make tools` (Debian packages podman, runc, debootstrap)")
    result = subprocess.run([exe, *args], env=kw.pop("env", None) or env(), capture_output=True, text=True,
                            timeout=timeout, check=False, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def image_labels(ref: str) -> dict[str, str] | None:
    """The image's labels, or None when podman has no such image."""
    result = podman("image", "inspect", "--format", "{{json .Labels}}", ref, check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout) or {}


def image_size(ref: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


# -- stand-in bases ---------------------------------------------------------------------------

def rootfs() -> Path:
    """Debian 12 (bookworm, Python 3.11) made by debootstrap, cached in CACHE; made when missing."""
    target = CACHE / "rootfs-bookworm"
    if (target / ".msam-complete").is_file():
        return target
    exe = shutil.which("debootstrap")
    if exe is None:
        raise RuntimeError("debootstrap is not installed: run `make tools`")
    tmp = CACHE / "rootfs-bookworm.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    result = subprocess.run([exe, "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
                             "bookworm", str(tmp), DEBIAN_MIRROR], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    # as python:3.11-slim: pip may install (no EXTERNALLY-MANAGED), `python` and `pip` exist
    for marker in (tmp / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    for name, to in (("python", "python3"), ("pip", "pip3")):
        link = tmp / "usr" / "bin" / name
        if not link.exists():
            link.symlink_to(to)
    shutil.rmtree(tmp / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (tmp / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)
    (tmp / ".msam-complete").write_text("debootstrap --variant=minbase bookworm\n")
    tmp.rename(target)
    return target


def stand_in_base() -> str:
    """``python:3.11-slim`` in podman's storage: the stand-in imported from :func:`rootfs` unless
    one is there already (a real python:3.11-slim, pulled where a registry is reachable, is kept)."""
    if image_labels(BASE) is not None:
        return BASE
    fs = rootfs()
    tar = subprocess.Popen(["tar", "-C", str(fs), "--exclude", "./.msam-complete", "-c", "."], stdout=subprocess.PIPE)
    try:
        podman("import", "--change", f"LABEL {STAND_IN_LABEL}=debian-bookworm-debootstrap",
               "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8", "-", BASE, stdin=tar.stdout)
    finally:
        tar.stdout.close()
        tar.wait(60)
    return BASE


def stand_in_redis() -> str:
    """``redis:7.4-alpine``: the stand-in base plus Debian's redis-server (7.0), unless present."""
    recipe = hashlib.sha256(REDIS_CONTAINERFILE.encode()).hexdigest()[:16]
    labels = image_labels(REDIS)
    if labels is not None and labels.get(STAND_IN_LABEL) is None:
        return REDIS  # a real redis image
    if labels is not None and labels.get(f"{STAND_IN_LABEL}.recipe") == recipe:
        return REDIS
    stand_in_base()
    context = CACHE / "redis-context"
    context.mkdir(parents=True, exist_ok=True)
    (context / "Containerfile").write_text(REDIS_CONTAINERFILE)
    podman("build", "--pull=never", "--label", f"{STAND_IN_LABEL}.recipe={recipe}", "-t", REDIS, str(context),
           timeout=900)
    return REDIS


# -- this machine's pip configuration, for the builds -----------------------------------------

def pip_config() -> tuple[str, list[Path]]:
    """(pip.conf text, local paths it names): ``pip config list`` of this machine, every scope and
    PIP_* variable merged into [global] as pip applies them."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PIP_REQUIRE_VIRTUALENV": "0"}).stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^(?::env:|[a-z]+)\.([a-z0-9-]+)='(.*)'$", line)
        if m and (line.startswith(":env:") or m.group(1) not in settings):
            settings[m.group(1)] = m.group(2)
    settings.pop("require-virtualenv", None)
    paths: list[Path] = []
    for key in ("cert", "client-cert", "constraint", "find-links", "extra-index-url", "index-url"):
        for item in settings.get(key, "").split():
            if item.startswith("file:"):
                local: Path | None = Path(urlparse(item).path)
            else:
                local = Path(item) if item.startswith("/") else None
            if local is not None and local.exists():
                # an index's pages link to its files by relative paths (../../files/...)
                paths.append(local.parent if key.endswith("index-url") else local)
    text = "# this machine's pip configuration (pip config list), for the image builds\n[global]\n"
    return text + "".join(f"{key} = {value}\n" for key, value in settings.items()), paths


def build_volumes() -> list[str]:
    """``podman build`` options: the pip configuration as /etc/pip.conf and every local path it
    names (CA bundle, find-links, file indexes, constraints), all read-only at the same paths."""
    text, paths = pip_config()
    conf = CACHE / "pip.conf"
    conf.write_text(text)
    opts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for p in paths:
        opts += ["-v", f"{p}:{p}:ro"]
    return opts


@dataclass
class Build:
    image: str
    seconds: float
    size_bytes: int
    cached: bool  # every step came from podman's layer cache


def build(dockerfile: str, image: str, *build_args: str, no_cache: bool = False) -> Build:
    """``podman build`` of a Dockerfile from the repository root (layer cache on unless
    ``no_cache``, nothing pulled)."""
    args = ["build", "--pull=never", "--layers", *(["--no-cache"] if no_cache else []), "-f", str(ROOT / dockerfile),
            "-t", image, *build_volumes()]
    for a in build_args:
        args += ["--build-arg", a]
    before = podman("image", "inspect", "--format", "{{.Id}}", image, check=False).stdout.strip()
    t0 = time.monotonic()
    result = podman(*args, str(ROOT), timeout=3000)
    seconds = time.monotonic() - t0
    after = podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
    if before and before != after:  # the image this tag named before (an older code): its own layers go
        podman("rmi", before, check=False)
    steps = len(re.findall(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: (?!FROM )", result.stdout, re.M))
    cached = len(re.findall(r"^--> Using cache", result.stdout, re.M)) >= steps
    return Build(image=image, seconds=round(seconds, 1), size_bytes=image_size(image), cached=cached)


def check_runs() -> None:
    """A container starts here, or the reason: :class:`KernelRefusesContainers` when the kernel
    refuses the namespaces a container needs, RuntimeError for anything else."""
    result = podman("run", "--rm", "--network=none", BASE, "python3", "-c", "print('ok')", check=False, timeout=300)
    if result.returncode == 0 and result.stdout.strip() == "ok":
        return
    text = result.stdout + result.stderr
    if _KERNEL_REFUSES.search(text):
        raise KernelRefusesContainers(text.strip()[-2000:])
    raise RuntimeError(f"podman cannot run a container ({result.returncode}):\n{text[-3000:]}")
