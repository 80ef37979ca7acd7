"""Faults, on a private stack (its own AOF Redis, API with tenant keys, one worker, a
webhook receiver): a worker killed mid-job finishes the job exactly once; Redis killed and
restarted keeps queued jobs; a restarted gateway keeps clients polling; tenants stay apart
over real HTTP; audit lines are written and no patient data reaches any log."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from msam_service import redis_conn, serve
from msam_service.auth import hash_key
from msam_service.metrics import RedisMetrics
from tests.integration.conftest import prompts, service_env
from tests.integration.harness import Service
from tests.unit.io.dicom_synth import make_ct_series

pytestmark = pytest.mark.slow

A = {"Authorization": "Bearer alpha-key"}
B = {"Authorization": "Bearer beta-key"}


class Hooks(ThreadingHTTPServer):
    received: Counter[str]


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.received[body["job_id"]] += 1  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class Stack(Service):
    run_dir: Path
    redis_proc: object

    def restart_redis(self, kill: bool) -> None:
        proc = self.redis_proc
        if kill:
            os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
            proc.wait(10)  # type: ignore[attr-defined]
        else:
            serve.stop(proc)  # type: ignore[arg-type]
        self.redis_proc, _ = serve.start_redis(self.run_dir, log=self.run_dir / "redis.log")

    def restart_api(self) -> None:
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait(10)
        port = int(self.api_url.rsplit(":", 1)[1])
        self.api = serve.start_api(self.env, "127.0.0.1", port, log=self.tmp / "api.log")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("faults")
    run_dir = Path(tempfile.mkdtemp(prefix="msam-ft-"))  # AOF on (serve.start_redis), short socket path
    redis_proc, url = serve.start_redis(run_dir, log=run_dir / "redis.log")
    hooks = Hooks(("127.0.0.1", 0), _Hook)
    hooks.received = Counter()
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    env = service_env(tmp, url, checkpoint, MSAM_QUEUE="faults",
                      MSAM_API_KEYS=f"alpha:{hash_key('alpha-key')},beta:{hash_key('beta-key')}",
                      MSAM_WEBHOOK_ALLOWLIST=hook_url, MSAM_WEBHOOK_SECRET="s" * 32)
    svc = Stack(tmp=tmp, redis_url=url, env=env)
    svc.run_dir, svc.redis_proc = run_dir, redis_proc
    svc.hooks, svc.hook_url = hooks, hook_url  # type: ignore[attr-defined]
    try:
        svc.start_worker("f1")
        svc.start_io_worker("io1")  # the webhooks
        svc.start_api()
        yield svc
    finally:
        svc.stop()
        hooks.shutdown()
        serve.stop(svc.redis_proc)  # type: ignore[arg-type]


def _submit(stack: Stack, ct_nifti: Path, lesions: int = 1, headers: dict[str, str] = A, **data: str) -> dict:
    doc = {"lesions": [{"positive": [[21 - 3 * n, 19 - 2 * n, 11]]} for n in range(lesions)]}
    with stack.client() as c, open(ct_nifti, "rb") as f:
        r = c.post("/segment", files={"image": ("ct.nii.gz", f)}, data={"prompts": json.dumps(doc), **data},
                   headers=headers)
    assert r.status_code == 202, r.text
    return r.json()


def _wait(stack: Stack, job_id: str, until: tuple[str, ...] = ("succeeded", "failed", "canceled"),
          timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    with stack.client() as c:
        while time.monotonic() < deadline:
            body = c.get(f"/jobs/{job_id}", headers=A).json()
            if body.get("status") in until:
                return body
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {until} after {timeout} s\n{stack.logs()}")


def test_worker_killed_mid_job_finishes_it_exactly_once(stack: Stack, ct_nifti: Path) -> None:
    r = redis_conn.client(stack.redis_url)
    before = RedisMetrics(r).counters().get("jobs_succeeded", 0)
    job = _submit(stack, ct_nifti, lesions=6, callback_url=stack.hook_url)  # type: ignore[attr-defined]
    job_id = job["job_id"]
    deadline = time.monotonic() + 60
    while r.hget(f"msam:job:{job_id}", "stage") != b"segment" and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(r.hget(f"msam:job:{job_id}", "worker").decode().rsplit("/", 1)[1])
    os.kill(child, signal.SIGKILL)  # the process running the job dies (an OOM kill looks like this)
    done = _wait(stack, job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, stack.logs())
    time.sleep(3)  # room for a duplicate to show up
    assert stack.hooks.received[job_id] == 1, stack.hooks.received  # type: ignore[attr-defined]
    assert RedisMetrics(r).counters().get("jobs_succeeded", 0) - before == 1
    worker_log = (stack.tmp / "worker-f1.log").read_text()
    assert worker_log.count(f"job {job_id} succeeded") == 1
    files = sorted(p.name for p in (Path(stack.env["MSAM_STORAGE_DIR"]) / "jobs" / job_id).iterdir())
    assert files == ["mask.nii.gz", "preview.png"]


def test_queued_jobs_survive_a_redis_crash_with_aof(stack: Stack, ct_nifti: Path) -> None:
    stack.kill_worker("f1")  # nothing consumes: the jobs stay queued
    jobs = [_submit(stack, ct_nifti)["job_id"] for _ in range(2)]
    time.sleep(1.5)  # appendfsync everysec: the AOF has them on disk now
    stack.restart_redis(kill=True)
    stack.start_worker("f1")
    for job_id in jobs:
        assert _wait(stack, job_id)["status"] == "succeeded"


def test_the_gateway_answers_503_while_redis_is_down(stack: Stack, ct_nifti: Path) -> None:
    job_id = _submit(stack, ct_nifti)["job_id"]
    _wait(stack, job_id)
    os.kill(stack.redis_proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    stack.redis_proc.wait(10)  # type: ignore[attr-defined]
    try:
        with stack.client() as c:
            r = c.get(f"/jobs/{job_id}", headers=A)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"]
    finally:
        stack.redis_proc, _ = serve.start_redis(stack.run_dir, log=stack.run_dir / "redis.log")
    serve.wait_until(lambda: httpx.get(stack.api_url + "/readyz", timeout=2).status_code == 200, 60, "readyz")
    assert _wait(stack, job_id)["status"] == "succeeded"  # the record came back from the AOF


def test_clients_keep_polling_across_a_gateway_restart(stack: Stack, ct_nifti: Path) -> None:
    job_id = _submit(stack, ct_nifti, lesions=3)["job_id"]
    seen: list[str] = []

    def poll() -> None:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=stack.api_url, timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    status = c.get(f"/jobs/{job_id}", headers=A).json()["status"]
                except httpx.HTTPError:
                    status = "unreachable"
                seen.append(status)
                if status == "succeeded":
                    return
                time.sleep(0.1)

    client = threading.Thread(target=poll)
    client.start()
    time.sleep(0.3)
    stack.restart_api()
    client.join(130)
    assert "unreachable" in seen and seen[-1] == "succeeded", seen[-20:]


def test_tenants_are_isolated_and_audited_without_patient_data(stack: Stack, ct_nifti: Path, tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "dicom", shape=(32, 32, 8))
    files = [("image", (f"IM{n}", p.read_bytes())) for n, p in enumerate(series.paths)]
    with stack.client() as c:
        r = c.post("/segment", files=files, data={"prompts": prompts((16, 16, 4))}, headers=A)
        assert r.status_code == 202, r.text
        job = r.json()
        done = _wait(stack, job["job_id"])
        assert done["status"] == "succeeded", done
        jid, vid = job["job_id"], job["volume_id"]
        assert c.get(f"/jobs/{jid}", headers=A).status_code == 200
        for method, path in (("GET", f"/jobs/{jid}"), ("GET", f"/jobs/{jid}/result"),
                             ("GET", f"/viewer/volumes/{vid}/image"), ("DELETE", f"/jobs/{jid}")):
            other = c.request(method, path, headers=B)
            assert other.status_code == 404 and other.json()["error"]["code"] == "not_found", (path, other.text)
            assert c.request(method, path).status_code == 401
        body = {"volume_id": vid, "prompts": {"lesions": [{"positive": [[16, 16, 4]]}]}}
        assert c.post("/segment", json=body, headers=B).status_code == 404
        assert c.get(f"/jobs/{jid}/result", headers=A).status_code == 200
        assert c.delete(f"/jobs/{jid}", headers=A).status_code == 204  # every file of the job goes
    storage = Path(stack.env["MSAM_STORAGE_DIR"])
    assert not (storage / "jobs" / jid).exists() and not (storage / "volumes" / vid).exists()
    api_log = (stack.tmp / "api.log").read_text()
    assert f'audit tenant=alpha action="POST /segment" job={jid} volume={vid} outcome=202' in api_log
    assert f'audit tenant=beta action="GET /jobs/{{job_id}}" job={jid} volume=- outcome=404' in api_log
    logs = stack.logs(tail=0)
    assert "Synthetic" not in logs and "SYN0001" not in logs and "alpha-key" not in logs


def _kill_running_child(r, job_id: str, previous: set[int], timeout: float = 60) -> int | None:
    """Wait for a delivery of ``job_id`` on a process not in ``previous`` and SIGKILL it; ``None``
    when the job ended instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = r.hmget(f"msam:job:{job_id}", "status", "worker")
        if raw[0] in (b"failed", b"succeeded", b"canceled"):
            return None
        if raw[0] == b"running" and raw[1]:
            pid = int(raw[1].decode().rsplit("/", 1)[1])
            if pid not in previous:
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} was not delivered again within {timeout} s")


def test_a_job_that_keeps_killing_its_worker_stops_after_max_deliveries(stack: Stack, ct_nifti: Path) -> None:
    """MSAM_MAX_DELIVERIES = 3 (the default): killed on 3 deliveries, failed on the 4th, not run again;
    the worker then takes the next job."""
    r = redis_conn.client(stack.redis_url)
    job_id = _submit(stack, ct_nifti, lesions=6)["job_id"]
    killed: set[int] = set()
    for _ in range(3):
        pid = _kill_running_child(r, job_id, killed)
        assert pid is not None, _wait(stack, job_id)
        killed.add(pid)
    done = _wait(stack, job_id)
    assert done["status"] == "failed" and done["error"]["code"] == "worker_lost", done
    assert "stopped its worker 3 times" in done["error"]["message"] and done["attempts"] == 4
    assert _wait(stack, _submit(stack, ct_nifti)["job_id"])["status"] == "succeeded"
    assert int(r.hget(f"msam:job:{job_id}", "deliveries")) == 4  # no delivery after the failure


def test_a_stuck_job_is_killed_at_the_hard_time_limit(stack: Stack, ct_nifti: Path) -> None:
    """A job that cannot react to the soft limit (its process stopped: SIGSTOP) is killed by the
    worker's main process at MSAM_JOB_TIME_LIMIT_S and fails ``timeout``; the worker lives on."""
    from msam_service.contract import JobRequest
    from msam_service.jobs import JobStore, new_id
    from msam_service.queue import enqueue, make_celery
    from msam_service.settings import Settings

    env = dict(stack.env, MSAM_QUEUE="hardlimit", MSAM_JOB_SOFT_TIME_LIMIT_S="2", MSAM_JOB_TIME_LIMIT_S="4",
               MSAM_VISIBILITY_TIMEOUT_S="30")
    worker = serve.start_worker(env, name="hl", log=stack.tmp / "worker-hl.log")
    r = redis_conn.client(stack.redis_url)
    try:
        serve.wait_until(lambda: any(True for _ in r.scan_iter(match=f"msam:worker:*:{worker.pid}")), 60, "worker hl")
        volume_id = _submit(stack, ct_nifti)["volume_id"]  # an uploaded volume (its job runs on the main queue)
        job_id = new_id()
        JobStore(r, 3600).create(job_id, tenant="alpha", volume_id=volume_id,
                                 request=JobRequest(prompts={"lesions": [{"positive": [[20, 20, 12]]}]}))
        enqueue(make_celery(Settings(redis_url=stack.redis_url, queue="hardlimit")), job_id)
        deadline = time.monotonic() + 60
        while r.hget(f"msam:job:{job_id}", "status") != b"running" and time.monotonic() < deadline:
            time.sleep(0.02)
        child = int(r.hget(f"msam:job:{job_id}", "worker").decode().rsplit("/", 1)[1])
        os.kill(child, signal.SIGSTOP)  # deaf to the soft limit's signal
        t0 = time.monotonic()
        done = _wait(stack, job_id, timeout=30)
        assert done["status"] == "failed" and done["error"]["code"] == "timeout", done
        assert "longer than 4 s and its process was stopped" in done["error"]["message"]
        assert time.monotonic() - t0 < 15
        def gone() -> bool:
            return not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()

        serve.wait_until(gone, 15, "the stuck process to be killed")
        assert worker.poll() is None
    finally:
        serve.stop(worker, timeout=5)
