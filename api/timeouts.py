"""The gateway's guards against slow, stalled and oversized clients.

* :class:`RequestTimeout` (``MSAM_REQUEST_TIMEOUT_S``): a request whose body has not arrived, or
  whose answer has not started, within the deadline gets 408 with a message (an answer already
  being sent, e.g. a large result download, is left to finish).
* :class:`BodyLimit` (``MSAM_MAX_UPLOAD_MB``, ``MSAM_MAX_JSON_KB``): 413 (415 for a body neither multipart nor JSON) once the bytes received
  pass the limit, whatever the transfer encoding (``Content-Length`` or chunked): a declared
  length only lets the refusal come before the first byte is read.
* :class:`HeaderTimeoutProtocol` (``MSAM_HEADER_TIMEOUT_S``): the request head itself must arrive
  in time. The app never sees a request until its head is complete, so this lives in the HTTP
  protocol: ``uvicorn api.main:app --http api.timeouts:HeaderTimeoutProtocol`` (``msam serve``
  passes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import h11
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("msam.api")


class RequestTimeout:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracked))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
            return
        except TimeoutError:
            pass
        except asyncio.CancelledError:  # the server is stopping or the client went away
            task.cancel()
            raise
        if started:  # the answer is under way (e.g. a large download): let it finish
            await task
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _send_408(send, self.timeout_s)


async def _send_408(send: Send, timeout_s: float) -> None:
    body: dict[str, Any] = {"error": {"code": "request_timeout", "message":
                                      f"the request did not complete within {timeout_s:g} s "
                                      "(MSAM_REQUEST_TIMEOUT_S); send the upload faster or split it"}}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def _json_answer(status: int, code: str, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple[list, bytes]:
    data = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra_headers]
    return headers, data


class BodyTooLarge(Exception):
    """Raised from ``receive`` to stop whatever reads a body that passed its limit."""


class BodyLimit:
    """413 (JSON body naming the setting) once a request body passes its limit; 415 instead for a
    body that is neither multipart nor JSON (an image sent as the raw body: its type is what is
    wrong, and the answer says how to upload it).

    Multipart bodies (image uploads) may reach ``MSAM_MAX_UPLOAD_MB`` plus 1 MiB of form
    overhead; every other body (JSON: ids and prompts) ``MSAM_MAX_JSON_KB``. The bytes are
    counted as the server hands them over, so a chunked body or a false ``Content-Length`` is
    stopped at the limit too, before anything buffers or parses it. A declared length over the
    limit is refused before the body is read. When the limit is passed mid-body, whatever the app
    was about to answer (FastAPI turns a failed body read into 400) is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, upload_mb: int, json_kb: int) -> None:
        self.app = app
        self.upload = (upload_mb * 2**20 + 2**20, f"the upload exceeds {upload_mb} MB (MSAM_MAX_UPLOAD_MB); "
                       "send a smaller image (e.g. one series, compressed) or ask the operator to raise the limit")
        self.json = (json_kb * 1024, f"the request body exceeds {json_kb} KB (MSAM_MAX_JSON_KB): a JSON request "
                     "carries only ids and prompts; upload images as multipart/form-data (POST /volumes or "
                     "POST /segment)")
        self.json_kb = json_kb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = media == "multipart/form-data"
        limit, message = self.upload if multipart else self.json
        status, code = 413, "too_large"
        if not multipart and media != "application/json" and not media.endswith("+json"):
            # an image sent as the raw body (curl --data-binary, a Content-Type of the file's):
            # the type is what is wrong, not the size
            status, code = 415, "unsupported_media_type"
            message = (f"the body is {repr(media) if media else 'without a Content-Type'} and over {self.json_kb} KB: "
                       "send images as multipart/form-data with the file in the field 'image' (curl: -F "
                       "image=@ct.nii.gz), everything else as JSON (-H 'Content-Type: application/json')")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _send_refusal(send, status, code, message)
            return
        received = 0
        exceeded = started = False

        async def counted() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return msg

        async def guarded(msg: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body cut short; the 413 goes instead
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await _send_refusal(send, status, code, message)


async def _send_refusal(send: Send, status: int, code: str, message: str) -> None:
    """The answer to a body over its limit: 413, or 415 for a body of a type no route takes."""
    # No "Connection: close": closing a socket with unread request bytes resets it, and the
    # client could lose this answer. uvicorn discards the rest of the body instead, for at most
    # MSAM_HEADER_TIMEOUT_S under HeaderTimeoutProtocol.
    headers, data = _json_answer(status, code, message)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _header_timeout_s() -> float:
    from msam_service.settings import get_settings

    return get_settings().header_timeout_s


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with two more deadlines, both ``MSAM_HEADER_TIMEOUT_S``:

    * the request head: counted from the connection's opening, or from the first byte of a later
      request on a kept-alive connection (idle time between requests is uvicorn's
      ``--timeout-keep-alive``). A connection that sent part of a head gets a 408 and is closed;
      one that sent nothing is closed. uvicorn alone waits for a head forever, so a client sending
      its headers a byte at a time holds a connection (and a file descriptor) indefinitely.
    * the rest of a body the app already answered (a 413): uvicorn reads and discards it so the
      client can read the answer, but a client still sending after the deadline is cut off.

    Everything after the head, up to the start of the answer, is ``MSAM_REQUEST_TIMEOUT_S``'s
    (:class:`RequestTimeout`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = _header_timeout_s()
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind = ""  # "head" or "drain" while armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout closes it
        else:  # the refused body still arriving, or a pipelined request already under way
            self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow_state(self) -> None:
        theirs, ours = self.conn.their_state, self.conn.our_state
        if self.transport.is_closing():
            self._disarm()
        elif theirs is h11.IDLE:
            self._arm("head")  # part of a head is here (or a drained body left the connection idle)
        elif theirs is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE):
            self._arm("drain")
        else:  # the head is complete: the app and RequestTimeout have the request now
            self._disarm()

    def _arm(self, kind: str) -> None:
        if self._deadline_kind == kind:
            return  # a deadline runs from its start, not from the latest byte
        self._disarm()
        self._deadline_kind = kind
        self._deadline = self.loop.call_later(self.head_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._deadline_kind = None, ""

    def _expired(self) -> None:
        kind = self._deadline_kind
        self._deadline, self._deadline_kind = None, ""
        if self.transport.is_closing():
            return
        if kind == "head" and self.conn.trailing_data[0]:
            headers, data = _json_answer(
                408, "request_timeout", f"the request line and headers did not arrive within "
                f"{self.head_timeout_s:g} s (MSAM_HEADER_TIMEOUT_S); send them at once",
                [(b"connection", b"close")])
            head = b"HTTP/1.1 408 Request Timeout\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
            self.transport.write(head + b"\r\n" + data)
            logger.info("closed a connection whose request head was incomplete after %g s", self.head_timeout_s)
        self.transport.close()
