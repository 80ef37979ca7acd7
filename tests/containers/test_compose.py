"""``docker-compose.yml`` up for real, with podman-compose: the cpu and dicom profiles on the
images built by conftest.py, with API keys set. Ports are published on 127.0.0.1 only; the
containers talk on the network podman-compose makes for the project.

In order (one stack for the module): the API answers /readyz; a DICOM series with a click comes
back as a DICOM-SEG that dciodvfy accepts; a series pushed by C-STORE to the listener starts a job
by its routing rule; the worker container's main process SIGKILLed mid-job, the container is
restarted by its restart policy and the job, delivered again, finishes exactly once; ``down``
leaves no container, volume or network of the project.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml

from msam_service import serve
from msam_service.auth import hash_key
from tests.containers import podman
from tests.containers.conftest import REPORT
from tests.unit.io.dicom_synth import dciodvfy_errors, make_ct_series

# the first test builds the images when the cache is cold (minutes on a shared 2-core machine)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

KEY = "compose-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TENANT = "ci"
AUTO_PROMPTS = {"space": "voxel", "lesions": [{"positive": [[24, 20, 8]], "label": "tumour"}]}
ROUTES = [
    {"name": "auto", "modality": "CT", "series_description": "^auto", "calling_ae": "STORESCU",
     "tenant": TENANT, "prompts": AUTO_PROMPTS},
    {"name": "drop-the-rest", "action": "ignore"},
]
# What the test changes in the compose file's environment: short limits, so a job lost with its
# worker comes back within the test; one 128^3 window per lesion and one torch thread (2 shared cores).
TEST_ENV = {
    "MSAM_MAX_WINDOWS": "1",
    "MSAM_TORCH_THREADS": "1",
    "MSAM_JOB_SOFT_TIME_LIMIT_S": "25",
    "MSAM_JOB_TIME_LIMIT_S": "30",
    "MSAM_VISIBILITY_TIMEOUT_S": "35",
}


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.started = 0.0  # time.monotonic() of `up`
        self.project = f"msamtest{os.getpid()}"
        self.tmp = tmp
        self.api_port, self.listener_port = serve.free_port(), serve.free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.override = tmp / "compose.test.yml"
        self.override.write_text(yaml.safe_dump({"services": {
            name: {"environment": TEST_ENV} for name in ("api", "worker-cpu", "dicom-listener")}}))
        self.env = {k: v for k, v in podman.env().items() if not k.startswith("MSAM_") and k != "REDIS_URL"}
        self.env.update({
            "MSAM_API_KEYS": f"{TENANT}:{hash_key(KEY)}",
            "MSAM_PUBLISH_ADDRESS": "127.0.0.1",
            "MSAM_PORT": str(self.api_port),
            "MSAM_DICOM_LISTENER_PORT": str(self.listener_port),
            "MSAM_DICOM_CALLING_AES": json.dumps(["STORESCU"]),
            "MSAM_DICOM_ROUTES": json.dumps(ROUTES),
        })

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        exe = podman.PODMAN_COMPOSE
        if not os.access(exe, os.X_OK):
            pytest.fail(f"podman-compose is not installed at {exe}: run `make tools`")
        cmd = [exe, "-p", self.project, "-f", str(podman.ROOT / "docker-compose.yml"), "-f", str(self.override),
               "--profile", "cpu", "--profile", "dicom", *args]
        result = subprocess.run(cmd, cwd=podman.ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def container(self, service: str) -> str:
        out = podman.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                            "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}").stdout
        names = out.split()
        assert len(names) == 1, (service, names)
        return names[0]

    def inspect(self, service: str) -> dict[str, Any]:
        return json.loads(podman.podman("inspect", self.container(service)).stdout)[0]

    def logs(self, service: str) -> str:
        r = podman.podman("logs", self.container(service), check=False)
        return r.stdout + r.stderr

    def all_logs(self) -> str:
        return "\n".join(f"== {s}\n{self.logs(s)[-3000:]}" for s in ("redis", "api", "worker-cpu", "dicom-listener"))

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=io.podman.compose.project={self.project}"
        return {
            "containers": podman.podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split(),
            "pods": podman.podman("pod", "ps", "--filter", label, "--format", "{{.Name}}").stdout.split(),
            "volumes": podman.podman("volume", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split(),
            "networks": [n for n in podman.podman("network", "ls", "--format", "{{.Name}}").stdout.split()
                         if n.startswith(f"{self.project}_")],
        }

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=60)

    def wait_job(self, job_id: str, timeout: float, until: tuple[str, ...] = ("succeeded", "failed", "canceled"),
                 stage: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                body = c.get(f"/jobs/{job_id}").json()
                if body.get("status") in until and (stage is None or body.get("stage") == stage):
                    return body
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {body.get('status')}/{body.get('stage')} after "
                                         f"{timeout} s\n{self.all_logs()}")
                time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(images: dict[str, podman.Build], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("compose"))
    t0 = time.monotonic()
    try:
        s.compose("up", "-d", "--no-build")
        deadline = time.monotonic() + 240
        while True:
            try:
                r = httpx.get(s.url + "/readyz", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"/readyz not 200 within 240 s after `up`\n{s.all_logs()}")
            time.sleep(1)
        REPORT["compose up -> /readyz 200 s"] = round(time.monotonic() - t0, 1)
        # the DICOM listener starts beside the API: wait for its own "listening" line too
        while "msam dicom-listener: AE" not in s.logs("dicom-listener"):
            if time.monotonic() > deadline:
                raise AssertionError(f"the DICOM listener did not start within 240 s after `up`\n{s.all_logs()}")
            time.sleep(1)
        s.started = t0
        yield s
    finally:
        if s.leftovers()["containers"]:
            subprocess.run([podman.PODMAN_COMPOSE, "-p", s.project, "-f", str(podman.ROOT / "docker-compose.yml"),
                            "-f", str(s.override), "--profile", "cpu", "--profile", "dicom", "down", "-v",
                            "-t", "10"], cwd=podman.ROOT, env=s.env, capture_output=True, timeout=600, check=False)


def test_published_ports_are_on_loopback_only(stack: Stack) -> None:
    for service, port in (("api", 8000), ("dicom-listener", 11112)):
        bindings = stack.inspect(service)["HostConfig"]["PortBindings"][f"{port}/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"], (service, bindings)
    with httpx.Client(base_url=stack.url) as c:  # the API keys reach the api: no key, no job
        assert c.get("/jobs/" + "0" * 32).status_code == 401


def test_dicom_series_with_a_click_gives_a_valid_dicom_seg(stack: Stack, tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "src", shape=(48, 40, 16), spacing=(1.2, 1.1, 2.5), seed=1)
    files = [("image", (f"IM{n}", p.read_bytes(), "application/dicom")) for n, p in enumerate(series.paths)]
    prompts = {"space": "voxel", "lesions": [{"positive": [[24, 20, 8]], "label": "tumour"}]}
    with stack.client() as c:
        r = c.post("/segment", files=files, data={"prompts": json.dumps(prompts)})
        assert r.status_code == 202, r.text
        job = stack.wait_job(r.json()["job_id"], timeout=240)
        assert job["status"] == "succeeded", (job, stack.all_logs())
        REPORT.setdefault("compose up -> first DICOM-SEG s", round(time.monotonic() - stack.started, 1))
        got = c.get(f"/jobs/{job['job_id']}/result", params={"format": "dicom-seg"})
        assert got.status_code == 200, got.text
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(got.content)
    assert dciodvfy_errors(seg) == []
    import pydicom

    ds = pydicom.dcmread(seg)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid


def test_a_series_pushed_to_the_listener_starts_its_job(stack: Stack, tmp_path: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.fail("dcmtk's storescu is not installed: run `make tools`")
    series = make_ct_series(tmp_path / "auto", shape=(48, 40, 16), spacing=(1.2, 1.1, 2.5),
                            series_description="auto CT", seed=4)
    sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "MSAM", "127.0.0.1", str(stack.listener_port),
                           *map(str, series.paths)], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, (sent.stdout, sent.stderr, stack.logs("dicom-listener"))
    deadline = time.monotonic() + 120
    while not (m := re.search(r"by rule 'auto', job ([0-9a-f]{32})", stack.logs("dicom-listener"))):
        assert time.monotonic() < deadline, stack.all_logs()
        time.sleep(0.5)
    job = stack.wait_job(m.group(1), timeout=240)
    assert job["status"] == "succeeded", (job, stack.all_logs())
    with stack.client() as c:
        got = c.get(f"/jobs/{job['job_id']}/result", params={"format": "dicom-seg"})
        assert got.status_code == 200, got.text
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(got.content)
    assert dciodvfy_errors(seg) == []


def _nifti(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 60, (64, 56, 24)).astype(np.float32) - 200
    ii, jj, kk = np.indices(arr.shape)
    arr[((ii - 32) ** 2 + (jj - 28) ** 2 + ((kk - 12) * 2) ** 2) < 64] += 500
    affine = np.array([[-1.2, 0, 0, 40.0], [0, 1.1, 0, -25.0], [0, 0, 2.5, 12.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def test_worker_container_killed_mid_job_finishes_the_job_exactly_once(stack: Stack, tmp_path: Path) -> None:
    # six lesions on distinct crops: six encoder passes, a window wide enough to kill the worker mid-job
    lesions = [{"positive": [[32 - 4 * n, 28 - 3 * n, 12]]} for n in range(6)]
    before = stack.inspect("worker-cpu")
    with stack.client() as c, open(_nifti(tmp_path / "ct.nii.gz"), "rb") as f:
        r = c.post("/segment", files={"image": ("ct.nii.gz", f)}, data={"prompts": json.dumps({"lesions": lesions})})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    stack.wait_job(job_id, timeout=120, until=("running",), stage="segment")  # past loading: real work lost

    # SIGKILL the container's main process from the host, as the OOM killer would (`podman kill`
    # counts as a stop by the user, after which podman, like docker, does not restart it)
    os.kill(stack.inspect("worker-cpu")["State"]["Pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # the restart policy (unless-stopped) brings the same container back
        state = stack.inspect("worker-cpu")
        if state["State"]["Running"] and state["RestartCount"] == before["RestartCount"] + 1:
            break
        assert time.monotonic() < deadline, f"the worker was not restarted: {state['State']}\n{stack.all_logs()}"
        time.sleep(0.5)

    done = stack.wait_job(job_id, timeout=300)  # redelivered after MSAM_VISIBILITY_TIMEOUT_S
    assert done["status"] == "succeeded", (done, stack.all_logs())
    assert done["attempts"] == 2, done
    logs = stack.logs("worker-cpu")
    assert logs.count(f"job {job_id} succeeded") == 1, logs[-4000:]
    assert logs.count(f"job {job_id} delivered again") == 1, logs[-4000:]


def test_down_leaves_nothing_running(stack: Stack) -> None:
    stack.compose("down", "-v", "-t", "30")
    assert stack.leftovers() == {"containers": [], "pods": [], "volumes": [], "networks": []}
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack.url + "/healthz", timeout=5)
