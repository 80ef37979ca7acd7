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
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

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


def install(app: FastAPI) -> None:
    _ensure_handler()

    @app.middleware("http")
    async def _audit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path == "/" or request.url.path.startswith(_SKIP):
            return await call_next(request)
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", None) or (
                request.url.path if request.url.path in ("/openapi.json", "/docs", "/redoc") else "unmatched")
            params = request.scope.get("path_params") or {}
            state = request.scope.get("state") or {}
            job = str(params.get("job_id") or state.get("job_id") or "")
            volume = str(params.get("volume_id") or state.get("volume_id") or "")
            job = job if not job or (job.isalnum() and len(job) <= 64) else "invalid"  # never echo a path
            AUDIT.info(line(str(state.get("tenant", "-")), f"{request.method} {route}", job, volume, status,
                            (time.perf_counter() - start) * 1000))
