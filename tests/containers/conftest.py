"""The images built with podman (tests/containers/podman.py), once per test session, and a report
of their sizes and build times at the end of the run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict

import pytest

from tests.containers import podman

REPORT: dict[str, object] = {}


@pytest.fixture(scope="session")
def images() -> Iterator[dict[str, podman.Build]]:
    """The stand-in bases (made when missing) and msam's API and CPU worker images, built from
    deploy/docker/ as users build them, with this machine's pip configuration mounted."""
    t0 = time.monotonic()
    try:
        podman.stand_in_base()
        podman.check_runs()
    except podman.KernelRefusesContainers as exc:
        pytest.skip(f"this kernel refuses the namespaces a container needs; podman says: {exc}")
    podman.stand_in_redis()
    REPORT["stand-in bases s"] = round(time.monotonic() - t0, 1)
    built = {
        "api": podman.build("deploy/docker/api.Dockerfile", podman.API_IMAGE),
        # CPU torch from this machine's pip configuration (no torch index is reachable here)
        "worker-cpu": podman.build("deploy/docker/worker.Dockerfile", podman.WORKER_CPU_IMAGE,
                                   "TORCH_VARIANT=cpu", "TORCH_INDEX=", "DEVICE=cpu"),
    }
    REPORT["images"] = {name: asdict(b) for name, b in built.items()}
    yield built


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    terminalreporter.section("msam images (podman)")
    for name, b in REPORT.get("images", {}).items():  # type: ignore[union-attr]
        terminalreporter.line(f"{name:<11} {b['image']:<24} {b['size_bytes'] / 1e6:8.0f} MB  built in "
                              f"{b['seconds']:6.1f} s{' (all layers cached)' if b['cached'] else ''}")
    for key, value in REPORT.items():
        if key != "images":
            terminalreporter.line(f"{key}: {value}")
    out = podman.CACHE / "last-report.json"
    out.write_text(json.dumps(REPORT, indent=2))
    terminalreporter.line(f"(also in {out})")
