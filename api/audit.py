"""One audit line per API request: who (tenant), what (action, job, volume), outcome (status).

Logger ``msam.audit`` (one line per request on stderr unless the deployment configures logging):
``audit tenant=<t> action="<METHOD> <route>" job=<id> volume=<id> outcome=<status> ms=<n>``.
Route *templates* are logged, never query strings, file names, prompts or headers, so no
patient data and no key can reach the line. Probes (/healthz, /readyz, /metrics) and the
viewer's static files are not audited.
"""

from __future__ import annotations

import logging
import sys
import time
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.asgi import StatusRecorder

AUDIT = logging.getLogger("msam.audit")
_SKIP = ("/healthz", "/readyz", "/metrics", "/static", "/favicon.ico")


def _ensure_handler() -> None:
    if not AUDIT.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        AUDIT.addHandler(handler)
        AUDIT.setLevel(logging.INFO)
        AUDIT.propagate = False


def line(tenant: str, action: str, job: str, volume: str, outcome: int, ms: float) -> str:
    return (f'audit tenant={tenant} action="{action}" job={job or "-"} volume={volume or "-"} '
            f"outcome={outcome} ms={ms:.0f}")


class AuditLog:
    """ASGI middleware writing :func:`line` for each request once it is answered (or failed: 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/" or path.startswith(_SKIP):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        answered = StatusRecorder(send, 500)
        try:
            await self.app(scope, receive, answered)
        finally:
            # the router writes the matched route and its parameters into this same scope
            route = getattr(scope.get("route"), "path", None) or (
                path if path in ("/openapi.json", "/docs", "/redoc") else "unmatched")
            params = scope.get("path_params") or {}
            state = scope.get("state") or {}
            job = str(params.get("job_id") or state.get("job_id") or "")
            volume = str(params.get("volume_id") or state.get("volume_id") or "")
            job = job if not job or (job.isalnum() and len(job) <= 64) else "invalid"  # never echo a path
            AUDIT.info(line(str(state.get("tenant", "-")), f"{scope['method']} {route}", job, volume,
                            answered.status, (time.perf_counter() - start) * 1000))


def install(app: FastAPI) -> None:
    _ensure_handler()
    app.add_middleware(AuditLog)
