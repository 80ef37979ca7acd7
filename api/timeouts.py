"""The request deadline (``MSAM_REQUEST_TIMEOUT_S``): a request whose body has not arrived, or
whose answer has not started, within the deadline gets 408 with a message (an answer already
being sent, e.g. a large result download, is left to finish). Protects the gateway's
connections from slow or stalled clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
