"""bench/load.py's hostile clients, without a stack: the payload list builds, each payload held
in memory is small while the bombs declare what they claim, the chunked bodies pass the limits,
the slow head reads a 408 and the close, and answers are sorted into expected, unexpected and
errors."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import socket
import sys
import threading
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
MiB = 2**20


@pytest.fixture(scope="module")
def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cases(load: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> list:
    ct = gzip.compress(b"\0" * 1000)
    return load.hostile_cases(tmp_path_factory.mktemp("hostile"), "0" * 32, ct, max_upload_mb=2, max_json_kb=8,
                              bomb_mb=256)


def _files_bytes(kwargs: dict) -> int:
    files = kwargs.get("files", {})
    items = files.values() if isinstance(files, dict) else [f for _, f in files]
    return (sum(len(data) for _, data in items) + sum(len(v) for v in kwargs.get("data", {}).values())
            + len(json.dumps(kwargs.get("json", "")).strip('"')))


def test_the_list_holds_every_hostile_kind_and_each_payload_is_small(cases: list) -> None:
    names = [c.name for c in cases]
    assert len(set(names)) == len(names) == 12
    for fragment in ("NRRD gzip bomb", "NRRD bzip2 bomb", "deflated DICOM bomb", "NIfTI gzip bomb", "zip bomb",
                     "chunked JSON", "chunked multipart", "slow request head", "nested", "zero pixdim",
                     "two modalities", "strings as coordinates"):
        assert any(fragment in n for n in names), fragment
    for case in cases:
        if case.slow_head:
            continue
        kwargs = case.request()
        if "content" not in kwargs:  # held payloads: what the bench keeps in memory and sends each time
            assert 0 < _files_bytes(kwargs) < 1 * MiB, case.name
            assert case.held < 1 * MiB
    for case in cases:  # a valid 4x4x4 image before its zeros: stored (201); everything else a 4xx
        if "NIfTI gzip bomb" in case.name:
            assert case.expect == (201,)
        else:
            assert case.expect and all(400 <= s < 500 for s in case.expect), case.name


def test_the_bombs_declare_256_mib(cases: list) -> None:
    by_name = {c.name.split(" (")[0]: c.request()["files"]["image"][1] for c in cases if "bomb" in c.name}
    nrrd = by_name["NRRD gzip bomb"]
    gz = nrrd[nrrd.index(b"\n\n") + 2:]
    assert int.from_bytes(gz[-4:], "little") == 256 * MiB  # gzip's ISIZE trailer
    assert int.from_bytes(by_name["NIfTI gzip bomb"][-4:], "little") > 256 * MiB
    assert zipfile.ZipFile(io.BytesIO(by_name["zip bomb"])).infolist()[0].file_size == 256 * MiB
    assert by_name["NRRD bzip2 bomb"].count(b"BZh9") == 1
    assert b"1.2.840.10008.1.2.1.99" in by_name["deflated DICOM bomb"][:400]  # Deflated Explicit VR Little Endian


def test_the_chunked_bodies_pass_their_limits_afresh_each_time(cases: list) -> None:
    json_case = next(c for c in cases if c.name.startswith("chunked JSON"))
    multipart = next(c for c in cases if c.name.startswith("chunked multipart"))
    for _ in range(2):  # a generator per send
        body = b"".join(json_case.request()["content"])
        assert len(body) > 8 * 1024 and json.loads(body)["volume_id"] == "0" * 32
        size = sum(len(chunk) for chunk in multipart.request()["content"])
        assert size > 2 * MiB + MiB  # the API allows the limit plus 1 MiB of form overhead


def test_slow_head_reads_the_408_and_the_close(load: ModuleType) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = []

    def serve_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(0.5)
            try:
                received.append(conn.recv(4096))
                conn.recv(4096)
            except TimeoutError:
                pass
            conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\n")

    t = threading.Thread(target=serve_once)
    t.start()
    try:
        assert load.slow_head(port, header_timeout_s=0.5, every_s=0.05) == ("408", "closed")
    finally:
        t.join(5)
        server.close()
    assert received and len(received[0]) < 5  # a byte at a time


def test_answers_are_sorted_and_compared(load: ModuleType, cases: list) -> None:
    tally = load.HostileTally()
    bomb = next(c for c in cases if c.name.startswith("NRRD gzip"))
    head = next(c for c in cases if c.slow_head)
    tally.record(bomb, "422", 0.01, False)
    tally.record(bomb, "201", 0.01, False)
    tally.record(bomb, "500", 0.01, True)
    tally.record(head, "closed", 3.0, False)
    report = tally.report()
    assert report["sent"] == 4 and report["by_status"] == {"201": 1, "422": 1, "500": 1, "closed": 1}
    assert report["errors"] == 1 and report["unexpected"] == 1
    clean = {"job_latency_s": {"p50": 1.0, "p99": 2.0},
             "api_latency_ms": {k: {"p50": 10.0, "p99": 20.0} for k in ("submit", "poll")},
             "job_phases_s": {k: {"p50": 0.5, "p99": 1.0} for k in ("queue", "run", "seen_after")}}
    mixed = json.loads(json.dumps(clean))
    mixed["job_latency_s"] = {"p50": 1.4, "p99": 3.2}
    out = load.compare(clean, mixed)
    assert out["mixed_over_clean"]["job_p50"] == 1.4 and out["mixed_over_clean"]["job_p99"] == 1.6
    assert out["jobs_within_target"] is False
