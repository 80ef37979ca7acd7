"""The gateway's HTTP limits under abuse: one private API (no worker) with
``MSAM_MAX_UPLOAD_MB=1`` and ``MSAM_REQUEST_TIMEOUT_S=5``, its own Redis.

    python bench/limits.py

Prints, as JSON, for each case the answer, the time to it and the growth of the API's peak RSS
(``VmHWM``, reset before each case):

* a 200 MB multipart body sent chunked (no ``Content-Length``);
* a 200 MB JSON body sent chunked (a valid document padded with spaces);
* a 26 MB JSON body of 10^6 lesions, with the slowest ``/healthz`` answered meanwhile;
* a request head sent at one byte per second: when the connection is closed (cap 20 s);
* Redis frozen with SIGSTOP: the answer to ``GET /jobs/<id>`` and its time.

Run from another checkout (``cd OTHER && PYTHONPATH=$PWD python /path/to/bench/limits.py``) to
measure that code with the same cases.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, os.getcwd())  # the checkout being measured (see above)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from msam_service import serve  # noqa: E402
from tests.integration.conftest import make_checkpoint, service_env  # noqa: E402
from tests.integration.harness import Service  # noqa: E402

MB = 2**20


def vm_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def multipart_padded(mb: int, boundary: str) -> Iterator[bytes]:
    prompts = json.dumps({"lesions": [{"positive": [[1, 2, 3]]}]})
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompts\"\r\n\r\n{prompts}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"ct.nii\"\r\n\r\n").encode()
    for _ in range(mb):
        yield b"\0" * MB
    yield f"\r\n--{boundary}--\r\n".encode()


def json_padded(mb: int) -> Iterator[bytes]:
    yield b'{"volume_id": "' + b"0" * 32 + b'", "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}'
    for _ in range(mb):
        yield b" " * MB
    yield b"}"


def slow_head(port: int, cap_s: float = 20.0) -> float | None:
    """Seconds until the server closed a connection that sends its head at 1 byte/s; None: still open."""
    drip = list(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(1.0)
        t0 = time.monotonic()
        while time.monotonic() - t0 < cap_s:
            try:
                if drip:
                    s.sendall(bytes([drip.pop(0)]))
                if not s.recv(4096):
                    return time.monotonic() - t0
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - t0
    return None


def run() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="msam-limits-"))
    redis_proc, url = serve.start_redis(tmp / "redis", log=tmp / "redis.log")
    env = service_env(tmp, url, make_checkpoint(tmp / "m.safetensors"), MSAM_MAX_UPLOAD_MB="1",
                      MSAM_REQUEST_TIMEOUT_S="5")
    svc = Service(tmp=tmp, redis_url=url, env=env)
    out: dict = {}
    try:
        svc.start_api()
        assert svc.api is not None
        pid = svc.api.pid

        def reset() -> float:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            return vm_mb(pid, "VmRSS")

        for name, body, ctype in (("chunked_200MB_multipart", multipart_padded(200, "bb"),
                                   "multipart/form-data; boundary=bb"),
                                  ("chunked_200MB_json", json_padded(200), "application/json")):
            before, t0 = reset(), time.monotonic()
            r = httpx.post(svc.api_url + "/segment", content=body, headers={"content-type": ctype}, timeout=120)
            out[name] = {"status": r.status_code, "s": round(time.monotonic() - t0, 2),
                         "api_peak_rss_growth_mb": round(vm_mb(pid, "VmHWM") - before)}

        big = json.dumps({"volume_id": "0" * 32, "prompts": {"lesions": [{"positive": [[1, 2, 3]]}] * 10**6}}).encode()
        answer: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answer.append(httpx.post(
            svc.api_url + "/segment", content=(big[n:n + MB] for n in range(0, len(big), MB)),
            headers={"content-type": "application/json"}, timeout=120)))
        before, slowest = reset(), 0.0
        sender.start()
        with httpx.Client(base_url=svc.api_url) as c:
            while sender.is_alive():
                t0 = time.monotonic()
                c.get("/healthz", timeout=60)
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.02)
        out["json_26MB_lesions"] = {"status": answer[0].status_code if answer else None,
                                    "healthz_slowest_s": round(slowest, 2),
                                    "api_peak_rss_growth_mb": round(vm_mb(pid, "VmHWM") - before)}

        closed = slow_head(int(svc.api_url.rsplit(":", 1)[1]))
        out["slow_head_1_byte_per_s"] = {"closed_after_s": round(closed, 1) if closed else "open after 20 s"}

        os.kill(redis_proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            status: object = httpx.get(svc.api_url + "/jobs/" + "0" * 32, timeout=60).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        out["frozen_redis_get_job"] = {"status": status, "s": round(time.monotonic() - t0, 1)}
    finally:
        os.kill(redis_proc.pid, signal.SIGCONT)
        svc.stop()
        serve.stop(redis_proc)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
