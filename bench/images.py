"""Build times and sizes of msam's images with podman on this machine (tests/containers/podman.py):
each image built cold (``--no-cache``: every step runs, the stand-in base kept) and then again
from the layer cache, as the test suite builds them. With ``--cold-base``, also the stand-in
base from scratch: debootstrap into a temporary folder and ``podman import`` under a temporary
tag (the cached base and its tag are left as they are).

    .venv/bin/python bench/images.py [--cold-base]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.containers import podman  # noqa: E402

IMAGES = [("api", "deploy/docker/api.Dockerfile", podman.API_IMAGE, ()),
          ("worker-cpu", "deploy/docker/worker.Dockerfile", podman.WORKER_CPU_IMAGE,
           ("TORCH_VARIANT=cpu", "TORCH_INDEX=", "DEVICE=cpu"))]


def cold_base() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="msam-bench-base-"))
    saved = podman.CACHE
    try:
        podman.CACHE = tmp
        t0 = time.monotonic()
        fs = podman.rootfs()
        t1 = time.monotonic()
        podman.CACHE = saved
        import subprocess

        tar = subprocess.Popen(["tar", "-C", str(fs), "-c", "."], stdout=subprocess.PIPE)
        podman.podman("import", "-", "localhost/msam-bench-base:cold", stdin=tar.stdout)
        tar.wait(60)
        t2 = time.monotonic()
        print(f"stand-in base: debootstrap {t1 - t0:.0f} s, podman import {t2 - t1:.0f} s")
    finally:
        podman.CACHE = saved
        podman.podman("rmi", "localhost/msam-bench-base:cold", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold-base", action="store_true", help="also time the stand-in base from scratch")
    args = parser.parse_args()
    if args.cold_base:
        cold_base()
    podman.stand_in_base()
    podman.stand_in_redis()
    for name, dockerfile, image, build_args in IMAGES:
        cold = podman.build(dockerfile, image, *build_args, no_cache=True)
        cached = podman.build(dockerfile, image, *build_args)
        print(f"{name:<11} {image:<24} {cold.size_bytes / 1e6:6.0f} MB  cold {cold.seconds:6.1f} s  "
              f"cached {cached.seconds:5.1f} s{'' if cached.cached else ' (a step ran again!)'}")


if __name__ == "__main__":
    main()
