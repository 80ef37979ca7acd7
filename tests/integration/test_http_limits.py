"""HTTP limits on a real stack started the way ``msam serve`` starts it (uvicorn with
``serve.API_HTTP_PROTOCOL``), with its own Redis so that it can be frozen: body limits counted on
the bytes received (chunked too) with the API's peak memory bounded, /healthz answering while a
huge body is refused, slow request heads cut off, deep JSON nesting and lax prompt types refused
with a JSON 422, and a frozen Redis answered by a prompt 503."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from msam_service import serve
from tests.integration.conftest import prompts, service_env
from tests.integration.harness import Service

HEADER_TIMEOUT_S = 2.0


class Limited(Service):
    run_dir: Path
    redis_proc: object


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Limited]:
    """API only (nothing here needs a worker), 1 MB uploads, 64 KB JSON, 2 s request heads."""
    tmp = tmp_path_factory.mktemp("limits")
    run_dir = Path(tempfile.mkdtemp(prefix="msam-hl-"))
    redis_proc, url = serve.start_redis(run_dir, log=run_dir / "redis.log")
    env = service_env(tmp, url, checkpoint, MSAM_QUEUE="limits", MSAM_MAX_UPLOAD_MB="1", MSAM_MAX_JSON_KB="64",
                      MSAM_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), MSAM_REQUEST_TIMEOUT_S="30")
    svc = Limited(tmp=tmp, redis_url=url, env=env)
    svc.run_dir, svc.redis_proc = run_dir, redis_proc
    try:
        svc.start_api()
        yield svc
    finally:
        svc.stop()
        os.kill(redis_proc.pid, signal.SIGCONT)
        serve.stop(redis_proc)  # type: ignore[arg-type]


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _json_padded(mb: int) -> Iterator[bytes]:
    """A valid POST /segment JSON document padded with whitespace to ``mb`` MB, in 1 MB chunks."""
    yield b'{"volume_id": "' + b"0" * 32 + b'", "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}'
    for _ in range(mb):
        yield b" " * 2**20
    yield b"}"


def _multipart_padded(mb: int, boundary: str = "b0undary") -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompts\"\r\n\r\n{prompts((1, 2, 3))}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"ct.nii\"\r\n\r\n").encode()
    for _ in range(mb):
        yield b"\0" * 2**20
    yield f"\r\n--{boundary}--\r\n".encode()


def test_chunked_bodies_are_held_to_the_limits_with_bounded_memory(stack: Limited) -> None:
    assert stack.api is not None
    before = _peak_rss_mb(stack.api.pid)
    with stack.client() as c:
        for body, ctype, setting in ((_json_padded(20), "application/json", "MSAM_MAX_JSON_KB"),
                                     (_multipart_padded(20), "multipart/form-data; boundary=b0undary",
                                      "MSAM_MAX_UPLOAD_MB")):
            r = c.post("/segment", content=body, headers={"content-type": ctype})
            assert "content-length" not in r.request.headers  # sent chunked
            assert r.status_code == 413 and setting in r.json()["error"]["message"], r.text
        # the connection drained the refused body and still serves
        assert c.get("/healthz").status_code == 200
    grew = _peak_rss_mb(stack.api.pid) - before
    assert grew < 30, f"the API's peak memory grew by {grew:.0f} MB for two refused 20 MB bodies"


def test_healthz_answers_while_a_huge_json_body_is_refused(stack: Limited) -> None:
    doc = {"volume_id": "0" * 32, "prompts": {"lesions": [{"positive": [[1, 2, 3]]}] * 10**6}}
    big = json.dumps(doc).encode()  # 26 MB

    def chunks() -> Iterator[bytes]:
        for n in range(0, len(big), 2**20):
            yield big[n:n + 2**20]

    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(
        httpx.post(stack.api_url + "/segment", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)))
    slowest = 0.0
    with stack.client() as c:
        sender.start()
        while sender.is_alive():
            t0 = time.monotonic()
            assert c.get("/healthz", timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.02)
    sender.join()
    assert answer and answer[0].status_code == 413, answer
    assert slowest < 1.0, f"/healthz took {slowest:.1f} s while the body was refused"


def _until_closed(sock: socket.socket, drip: bytes, limit: float) -> tuple[float, bytes]:
    """Send ``drip`` a byte per 0.5 s until the server closes the connection: the time it took and
    what it answered. A closed connection shows as end of file, or as a reset when a byte was
    still sent after the server closed (which of the two is a race); both count as closed."""
    sock.settimeout(0.5)
    t0, reply = time.monotonic(), b""
    pending = list(drip)
    while time.monotonic() - t0 < limit:
        if pending:
            try:
                sock.sendall(bytes([pending.pop(0)]))
            except OSError:  # reset or broken pipe: the server closed it
                return time.monotonic() - t0, reply
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0, reply
        if not data:
            return time.monotonic() - t0, reply
        reply += data
    raise AssertionError(f"the connection was still open after {limit} s; got {reply!r}")


def test_a_slow_request_head_is_cut_off(stack: Limited) -> None:
    port = int(stack.api_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow:  # a byte every 0.5 s
        took, reply = _until_closed(slow, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200,
                                    HEADER_TIMEOUT_S + 3)
        assert reply.startswith(b"HTTP/1.1 408 ") and b"MSAM_HEADER_TIMEOUT_S" in reply, reply
        assert took >= HEADER_TIMEOUT_S - 0.5
    with socket.create_connection(("127.0.0.1", port)) as silent:
        _until_closed(silent, b"", HEADER_TIMEOUT_S + 3)
    assert httpx.get(stack.api_url + "/healthz", timeout=5).status_code == 200


def test_deep_nesting_in_form_fields_is_a_json_422(stack: Limited, ct_nifti: Path) -> None:
    with stack.client() as c:
        for data in ({"prompts": prompts((21, 19, 11)), "destinations": "[" * 5000},
                     {"prompts": '{"lesions": ' + "[" * 5000 + "]" * 5000 + "}"}):
            r = c.post("/segment", files={"image": ("ct.nii.gz", ct_nifti.read_bytes())}, data=data)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "invalid_request" and "nested" in r.json()["error"]["message"]


def test_prompt_numbers_are_strict(stack: Limited, ct_nifti: Path) -> None:
    with stack.client() as c:
        for doc, field in (({"lesions": [{"positive": [[21, 19, 11]]}], "iterations": True}, "iterations"),
                           ({"lesions": [{"positive": [[True, 19, 11]]}]}, "lesions.0.positive.0.0"),
                           ({"lesions": [{"positive": [[21, "19", 11]]}]}, "lesions.0.positive.0.1")):
            r = c.post("/segment", files={"image": ("ct.nii.gz", ct_nifti.read_bytes())},
                       data={"prompts": json.dumps(doc)})
            assert r.status_code == 422 and r.json()["error"]["message"].startswith(field + ": "), r.text


def test_a_frozen_redis_is_a_prompt_503_and_the_gateway_recovers(stack: Limited) -> None:
    """SIGSTOP: Redis accepts connections but never answers (a hung host, a long fork)."""
    pid = stack.redis_proc.pid  # type: ignore[attr-defined]
    with stack.client() as c:
        assert c.get("/jobs/" + "0" * 32).status_code == 404
        os.kill(pid, signal.SIGSTOP)
        try:
            for path in ("/jobs/" + "0" * 32, "/readyz"):
                t0 = time.monotonic()
                r = c.get(path, timeout=20)
                took = time.monotonic() - t0
                assert r.status_code == 503 and took < 5, (path, r.status_code, took)
            assert r.json()["redis"] is False
            assert c.get("/jobs/" + "0" * 32).json()["error"]["code"] == "unavailable"
        finally:
            os.kill(pid, signal.SIGCONT)
        r = c.get("/jobs/" + "0" * 32)
        assert r.status_code == 404, r.text  # Redis answers again: so does the gateway
