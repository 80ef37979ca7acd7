"""HTTP limits in-process: body size counted on the bytes received (chunked bodies too), strict
prompt types, JSON nesting, a JSON 500; and the request-head deadline on a real uvicorn server
(in a thread, tiny app) with :class:`api.timeouts.HeaderTimeoutProtocol`."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.errors import ApiError
from api.main import create_app
from api.routes.segment import MAX_JSON_DEPTH, check_nesting
from api.timeouts import BodyLimit, HeaderTimeoutProtocol
from msam_service.settings import Settings

VOLUME = "0" * 32


@pytest.fixture
def nifti(tmp_path: Path) -> bytes:
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8), np.int16), np.diag([1.5, 1.5, 3.0, 1])), str(path))
    return path.read_bytes()


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(redis_url=redis_url, storage_dir=tmp_path / "storage", max_upload_mb=1, max_json_kb=16)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for n in range(0, len(data), size):
        yield data[n:n + size]


# -- body size ------------------------------------------------------------------------------

def test_a_chunked_json_body_over_the_json_limit_is_413(client: TestClient) -> None:
    doc = {"volume_id": VOLUME, "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}}
    body = json.dumps(doc).encode()[:-1] + b" " * (64 * 1024) + b"}"  # valid JSON, 64 KB of padding
    r = client.post("/segment", content=_chunks(body), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # sent chunked
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large" and "MSAM_MAX_JSON_KB" in r.json()["error"]["message"]
    declared = client.post("/segment", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "MSAM_MAX_JSON_KB" in declared.json()["error"]["message"]
    small = client.post("/segment", json=doc)  # under the limit: on to the route (no such volume)
    assert small.status_code == 404, small.text


def test_an_image_sent_as_the_raw_body_is_a_415_that_says_how_to_upload(client: TestClient, nifti: bytes) -> None:
    """``curl --data-binary @ct.nii.gz``: the body's type is what is wrong, whatever its size."""
    image = nifti + b"\0" * (64 * 1024)
    for headers, content in (({"content-type": "application/octet-stream"}, image),
                             ({"content-type": "application/gzip"}, _chunks(image)), ({}, image)):
        r = client.post("/volumes", content=content, headers=headers)
        assert r.status_code == 415, r.text
        message = r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "unsupported_media_type"
        assert "multipart/form-data" in message and "field 'image'" in message and "-F image=@" in message
    small = client.post("/volumes", content=b"abc", headers={"content-type": "application/octet-stream"})
    assert small.status_code == 415 and "field 'image'" in small.json()["error"]["message"], small.text


def test_a_chunked_multipart_body_over_the_upload_limit_is_413(client: TestClient) -> None:
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"ct.nii\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + b"\0" * (3 * 2**20) + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/volumes", content=_chunks(body, 2**16),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert "MSAM_MAX_UPLOAD_MB" in r.json()["error"]["message"]


def test_body_limit_stops_the_reader_and_replaces_its_answer() -> None:
    """The app never gets a byte past the limit, and what it answers to the interrupted read
    (FastAPI answers 400 to a failed body read) is replaced by the 413."""
    seen: list[int] = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        total = 0
        try:
            while True:
                msg = await receive()
                total += len(msg.get("body", b""))
                seen.append(total)
                if not msg.get("more_body"):
                    break
        except Exception:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"There was an error parsing the body"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run(chunks: int) -> list[dict]:
        messages = [{"type": "http.request", "body": b"x" * 1000, "more_body": n < chunks - 1} for n in range(chunks)]
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0)

        async def send(msg: dict) -> None:
            sent.append(msg)

        scope = {"type": "http", "headers": [(b"content-type", b"application/json")]}
        await BodyLimit(app, upload_mb=1, json_kb=4)(scope, receive, send)
        return sent

    ok = asyncio.run(run(4))
    assert ok[0]["status"] == 200 and seen[-1] == 4000
    seen.clear()
    refused = asyncio.run(run(50))
    assert [m["type"] for m in refused] == ["http.response.start", "http.response.body"]
    assert refused[0]["status"] == 413 and b"MSAM_MAX_JSON_KB" in refused[1]["body"]
    assert max(seen) <= 4096  # nothing past the limit reached the app


def test_a_multipart_text_field_over_the_json_limit_is_413(client: TestClient, nifti: bytes) -> None:
    prompts = json.dumps({"lesions": [{"positive": [[5, 5, 4]]}]}) + " " * (32 * 1024)
    r = client.post("/segment", files={"image": ("ct.nii.gz", nifti)}, data={"prompts": prompts})
    assert r.status_code == 413 and "MSAM_MAX_JSON_KB" in r.json()["error"]["message"], r.text


# -- strict prompt types --------------------------------------------------------------------

@pytest.mark.parametrize(("lesion", "extra", "field", "says"), [
    ({"positive": [[True, 5, 4]]}, {}, "lesions.0.positive.0.0", "not true/false"),
    ({"positive": [[5, "5", 4]]}, {}, "lesions.0.positive.0.1", "not a string"),
    ({"positive": [[5, 5, 4]], "negative": [[1, 1, False]]}, {}, "lesions.0.negative.0.2", "not true/false"),
    ({"positive": [[5, 5, 4]], "box": [[0, 0, 0], ["9", 9, 7]]}, {}, "lesions.0.box.1.0", "not a string"),
    ({"positive": [[5, 5, 4]]}, {"iterations": True}, "iterations", "not true/false"),
    ({"positive": [[5, 5, 4]]}, {"iterations": "2"}, "iterations", "not a string"),
    ({"positive": [[5, 5, 4]]}, {"iterations": 2.0}, "iterations", "JSON integer"),
])
def test_prompt_numbers_are_strict(client: TestClient, nifti: bytes, lesion: dict, extra: dict, field: str,
                                   says: str) -> None:
    doc = {"lesions": [lesion], **extra}
    by_form = client.post("/segment", files={"image": ("ct.nii.gz", nifti)}, data={"prompts": json.dumps(doc)})
    by_json = client.post("/segment", json={"volume_id": VOLUME, "prompts": doc})
    for r, prefix in ((by_form, ""), (by_json, "prompts.")):
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and error["message"].startswith(prefix + field + ": "), error
        assert says in error["message"], error


def test_valid_numbers_still_pass(client: TestClient, nifti: bytes) -> None:
    doc = {"lesions": [{"positive": [[5, 5.5, 4e0]], "negative": [[1, 1, 1]], "box": [[0, 0, 0], [9, 9, 7]]}],
           "iterations": 3}
    r = client.post("/segment", files={"image": ("ct.nii.gz", nifti)}, data={"prompts": json.dumps(doc)})
    assert r.status_code == 202, r.text


# -- JSON nesting ---------------------------------------------------------------------------

def test_deeply_nested_form_fields_are_422_json(client: TestClient, nifti: bytes) -> None:
    prompts = json.dumps({"lesions": [{"positive": [[5, 5, 4]]}]})
    for data in ({"prompts": prompts, "destinations": "[" * 5000}, {"prompts": prompts, "destinations": "[" * 5000 + "]" * 5000},
                 {"prompts": '{"lesions": ' + "[" * 5000 + "]" * 5000 + "}"}):
        r = client.post("/segment", files={"image": ("ct.nii.gz", nifti)}, data=data)
        assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
        assert "nested more than" in r.json()["error"]["message"], r.text


def test_the_nesting_check_reads_strings_as_strings() -> None:
    check_nesting("f", json.dumps({"label": "[" * 100 + '\\"[{' * 50}))  # brackets inside a string
    check_nesting("f", "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    with pytest.raises(ApiError) as err:
        check_nesting("destinations", '["a\\\\", ' + "[" * MAX_JSON_DEPTH + "]")  # an escaped backslash ends no string
    assert err.value.status == 422 and err.value.message.startswith("destinations: ")
    t0 = time.perf_counter()
    check_nesting("f", '"' + '\\"' * 200_000)  # linear, also on an unterminated string
    assert time.perf_counter() - t0 < 2


def test_an_unexpected_error_is_a_json_500(client: TestClient) -> None:
    def boom() -> None:
        raise RuntimeError("a bug")

    client.app.add_api_route("/boom", boom)  # type: ignore[attr-defined]
    r = client.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"


# -- the request-head deadline, on a real uvicorn server ------------------------------------

HEAD_TIMEOUT_S = 1.0


class _QuickHeadTimeout(HeaderTimeoutProtocol):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.head_timeout_s = HEAD_TIMEOUT_S


async def _echo(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = BodyLimit(_echo, upload_mb=1, json_kb=1)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=_QuickHeadTimeout,
                                        lifespan="off", log_level="warning", timeout_keep_alive=30))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(10)


def _closed_after(sock: socket.socket, drip: bytes, limit: float) -> tuple[float, bytes]:
    """Send ``drip`` a byte at a time (every 0.2 s) until the server closes; (seconds, reply)."""
    sock.settimeout(0.2)
    t0, reply = time.monotonic(), b""
    for byte in [drip[n:n + 1] for n in range(len(drip))] + [b""] * 1000:
        if byte:
            try:
                sock.sendall(byte)
            except OSError:
                break
        try:
            data = sock.recv(4096)
        except TimeoutError:
            data = None
        except OSError:
            break
        if data == b"":
            break
        reply += data or b""
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"still open after {limit} s")
    return time.monotonic() - t0, reply


def test_a_head_sent_a_byte_at_a_time_gets_408_and_is_closed(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        took, reply = _closed_after(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, HEAD_TIMEOUT_S + 3)
    assert took >= HEAD_TIMEOUT_S - 0.1
    assert reply.startswith(b"HTTP/1.1 408 ") and b"MSAM_HEADER_TIMEOUT_S" in reply


def test_a_silent_connection_is_closed(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        took, reply = _closed_after(sock, b"", HEAD_TIMEOUT_S + 3)
    assert reply == b"" and took >= HEAD_TIMEOUT_S - 0.1


def test_requests_in_time_are_served_and_kept_alive(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.settimeout(5)
        for _ in range(2):  # the deadline does not run across an answered request
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
            time.sleep(HEAD_TIMEOUT_S + 0.3)  # a slow body is RequestTimeout's business, not the head's
            sock.sendall(b"abc")
            reply = b""
            while not reply.endswith(b"\r\n\r\nok"):
                chunk = sock.recv(4096)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 ")
            time.sleep(HEAD_TIMEOUT_S + 0.3)  # idle between requests: the keep-alive timeout's


def test_a_refused_body_is_drained_for_a_bounded_time(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.settimeout(5)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b" " * 2048 + b"\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        # the client keeps sending: read and discarded, until the deadline cuts it off
        took, _ = _closed_after(sock, b"1\r\n \r\n" * 1000, HEAD_TIMEOUT_S + 3)
    assert took >= HEAD_TIMEOUT_S - 0.3
