"""RIS/PACS flows against a real Orthanc, inside a private network namespace.

Orthanc binds every interface and cannot be limited to loopback, so the whole PACS test module
(inner_orthanc.py: Redis, API, worker, DICOM listener, Orthanc, webhook receiver) runs in one
``unshare --net`` subprocess whose only interface is its own ``lo``; this test checks its
result. Needs Debian's orthanc + orthanc-dicomweb (and dcmtk for storescu): ``make tools``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _unshare() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare / ip (util-linux, iproute2) are needed for a private network namespace")
    cmd = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    probe = subprocess.run([*cmd, "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    return cmd


@pytest.mark.parametrize("inner", ["inner_orthanc.py", "inner_ris.py"])
def test_pacs_flows_against_orthanc_in_a_private_network_namespace(inner: str) -> None:
    if shutil.which("Orthanc") is None or not PLUGIN.exists():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (make tools)")
    inner = f"tests/integration/pacs/{inner}"
    script = f'ip link set lo up && exec "{sys.executable}" -m pytest -q -rA -p no:cacheprovider -x {inner}'
    env = dict(os.environ, MSAM_PACS_INNER="1")
    result = subprocess.run([*_unshare(), "sh", "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    out = result.stdout + result.stderr
    print(out[-6000:])
    assert result.returncode == 0, out[-12000:]
    summary = [line for line in out.splitlines() if re.search(r"\d+ passed", line)]
    assert summary and not re.search(r"failed|error|skipped", summary[-1]), out[-3000:]
