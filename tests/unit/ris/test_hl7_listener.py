"""The HL7 listener's MLLP side over real sockets: every framed message is answered on its
connection in its own character set, several messages may share a connection, a message over
the size limit is rejected, and a connection that stalls is closed (no RIS endpoint is
configured here, so every order is answered ``AR``; what an accepted order does is in
tests/integration/pacs)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hl7apy.parser import parse_message

from msam_service.pacs.settings import PacsSettings
from msam_service.ris import hl7, hl7_listener
from msam_service.settings import Settings
from tests.unit.worker.conftest import r, redis_url  # noqa: F401 - a private Redis

ORDER = "\r".join([
    "MSH|^~\\&|RIS|HOSP|MSAM|MSAM|20261206120000||ORM^O01|{control}|P|2.5||||||{charset}",
    "PID|1||P1^^^H^MR||M\u00fcller^J\u00fcrgen",
    "ORC|NW|PO1|FO1",
    "OBR|1|PO1|FO1|CTCHEST^CT chest||||||||||||||ACC-1",
]) + "\r"


@pytest.fixture
def listener():
    server = hl7_listener.make_server(hl7_listener.Orders(Settings(), PacsSettings(), None, lambda _: None),
                                      "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _ack(sock: socket.socket):
    return parse_message(hl7.read_framed(sock).replace("\n", "\r"), find_groups=False)


def test_orders_in_latin_1_and_utf_8_are_answered_on_one_connection(listener) -> None:
    with socket.create_connection(listener, timeout=10) as sock:
        for control, charset, encoding in (("C-LATIN", "8859/1", "iso8859-1"), ("C-NONE", "", "iso8859-1"),
                                           ("C-UTF8", "UNICODE UTF-8", "utf-8")):
            sock.sendall(hl7.START + ORDER.format(control=control, charset=charset).encode(encoding) + hl7.END)
            ack = _ack(sock)
            assert ack.msa.msa_1.to_er7() == "AR" and ack.msa.msa_2.to_er7() == control
            assert "not a configured RIS endpoint" in ack.msa.msa_3.to_er7()  # read through to the sender check
        sock.sendall(hl7.frame(ORDER.format(control="C-KOI", charset="KOI8-R")))
        ack = _ack(sock)
        assert ack.msa.msa_2.to_er7() == "C-KOI" and "KOI8-R" in ack.msa.msa_3.to_er7()


def test_a_message_over_the_limit_is_rejected_and_a_stalled_one_closed(listener, monkeypatch) -> None:
    monkeypatch.setattr(hl7_listener, "MAX_MESSAGE_BYTES", 4096)
    monkeypatch.setattr(hl7_listener, "READ_DEADLINE_S", 0.5)
    big = ORDER.format(control="C-BIG", charset="") + "NTE|1||" + "x" * 8000 + "\r"
    with socket.create_connection(listener, timeout=10) as sock:
        sock.sendall(hl7.frame(big))
        ack = _ack(sock)
        assert ack.msa.msa_1.to_er7() == "AR" and ack.msa.msa_2.to_er7() == "C-BIG"
        assert "longer than 4096 bytes" in ack.msa.msa_3.to_er7()
    with socket.create_connection(listener, timeout=10) as sock:
        sock.sendall(hl7.START + ORDER.format(control="C-HALF", charset="").encode()[:40])
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed without an answer once the deadline passed
        assert time.monotonic() - started < 5
    with socket.create_connection(listener, timeout=10) as sock:  # the listener still answers
        sock.sendall(hl7.frame(ORDER.format(control="C-AFTER", charset="")))
        assert _ack(sock).msa.msa_2.to_er7() == "C-AFTER"


def test_an_order_is_answered_when_the_pacs_does_not(r, monkeypatch) -> None:
    """A PACS that accepts the connection and never answers: the order is acknowledged AE within
    the listener's deadline, saying to send it again, instead of after every retry's timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel, never read or answered
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
    pacs = PacsSettings(dicomweb_nodes={"slow": url},
                        ris_endpoints={"ris": {"application": "RIS", "facility": "HOSP", "pacs": "slow"}})
    monkeypatch.setattr(hl7_listener, "LOOKUP_DEADLINE_S", 1.0)
    orders = hl7_listener.Orders(Settings(), pacs, r, lambda _: None)
    started = time.monotonic()
    reply = orders.handle(ORDER.format(control="C-SLOW", charset=""))
    took = time.monotonic() - started
    ack = parse_message(reply[1:-2].decode().replace("\n", "\r"), find_groups=False)
    assert ack.msa.msa_1.to_er7() == "AE" and ack.msa.msa_2.to_er7() == "C-SLOW"
    assert "did not answer within 1 s" in hl7._unescape(ack.err.err_8.to_er7()), ack.to_er7()
    assert took < 10  # not three tries of the lookup's own timeout
    assert r.keys("msam:job:*") == []  # no job made
    silent.close()
