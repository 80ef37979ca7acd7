"""The gateway: ``uvicorn api.main:app``. It validates, stores, enqueues and reports; it never
runs the model (see ``worker/``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from api import audit, errors, viewer
from api.asgi import StatusRecorder
from api.deps import Services
from api.timeouts import BodyLimit, RequestTimeout
from api.routes import health, info, jobs, metrics, segment, sessions, volumes
from msam_service import redis_conn
from msam_service import lifecycle
from msam_service.auth import is_loopback, load_keys
from msam_service.jobs import JobStore
from msam_service.metrics import GaugeSource, RedisCollector, RedisMetrics
from msam_service.queue import make_celery
from msam_service.settings import Settings, get_settings
from msam_service.storage import make_storage

logger = logging.getLogger("msam.api")


def build_services(settings: Settings) -> Services:
    if not settings.redis_url:
        raise RuntimeError("MSAM_REDIS_URL / REDIS_URL is not set; `msam serve` starts an embedded Redis")
    r = redis_conn.request_client(settings.redis_url, settings.redis_timeout_s)  # 503 soon when Redis hangs
    return Services(settings=settings, redis=r, store=JobStore(r, settings.job_ttl_s),
                    storage=make_storage(settings.storage_dir), queue=make_celery(settings, "msam-api"),
                    metrics=RedisMetrics(r), gauges=GaugeSource(r, settings.queue),
                    keys=load_keys(settings.key_entries()))


async def _sweeper(svc: Services) -> None:
    ttl = svc.settings.job_ttl_s
    while True:
        try:
            removed = await run_in_threadpool(lifecycle.sweep, svc.storage, svc.store, svc.redis, ttl,
                                              min(600.0, float(ttl)))
            if removed:
                logger.warning("expired %d stored item(s)", removed)
        except Exception as exc:  # keep sweeping whatever one pass hit
            logger.warning("sweep failed: %s", type(exc).__name__)
        await asyncio.sleep(svc.settings.sweep_interval_s)


def _document_extra_schemas(app: FastAPI) -> None:
    """Add the models that routes read by hand (``POST /segment``'s JSON body) to the OpenAPI
    components, so the document's ``$ref`` s resolve; every 422 is declared as the service's
    ``ErrorBody`` (FastAPI declares its own validation body, which the service never sends; the
    routers that take a key declare their 401)."""
    from fastapi.openapi.utils import get_openapi

    from api.schemas import ErrorBody, SegmentByVolume

    error_ref = {"$ref": "#/components/schemas/ErrorBody"}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            extra = SegmentByVolume.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in extra.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components.setdefault("SegmentByVolume", extra)
            components.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if "422" in responses:
                        responses["422"] = {"description": "the request cannot be served as sent; the message says why",
                                            "content": {"application/json": {"schema": error_ref}}}
            for unused in ("HTTPValidationError", "ValidationError"):
                if unused not in json.dumps(schema["paths"]):
                    components.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway. Refuses (``ValueError``) malformed API keys, and a non-loopback
    ``MSAM_HOST`` without keys."""
    settings = settings or get_settings()
    settings.check_listener()
    open_access = not settings.key_entries()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = build_services(settings)
        app.state.services = svc
        app.state.registry.register(RedisCollector(svc.metrics, svc.gauges))
        sweeper = asyncio.create_task(_sweeper(svc))
        if open_access:
            logger.warning("no API keys configured (MSAM_API_KEYS / MSAM_API_KEYS_FILE): every caller is "
                           "tenant 'public'; answering loopback clients only")
        yield
        sweeper.cancel()

    app = FastAPI(title="msam", version="0.1.0", lifespan=lifespan,
                  description="Promptable 3D lesion segmentation (M-SAM on SAM-Med3D): upload a CT/MR "
                              "volume with clicks, poll the job, download DICOM-SEG / RTSTRUCT / NIfTI / PNG.")
    registry = CollectorRegistry()
    app.state.registry = registry
    requests = Counter("msam_http_requests", "HTTP requests", ["route", "method", "status"], registry=registry)
    latency = Histogram("msam_http_request_seconds", "HTTP request latency", ["route"], registry=registry)
    errors.install(app)
    _document_extra_schemas(app)
    for router in (segment.router, volumes.router, sessions.router, jobs.router, health.router, info.router, metrics.router):
        app.include_router(router)
    viewer.install(app)  # the web viewer: page at /, assets under /static

    # innermost: counts the body bytes the routes read, before a parser buffers or spools them
    app.add_middleware(BodyLimit, upload_mb=settings.max_upload_mb, json_kb=settings.max_json_kb)

    app.add_middleware(LoopbackOnly, open_access=open_access)
    app.add_middleware(RequestMetrics, requests=requests, latency=latency)
    app.add_middleware(RequestTimeout, timeout_s=settings.request_timeout_s)
    audit.install(app)  # outermost: every answer is audited, a 408 too
    return app


class LoopbackOnly:
    """Without API keys, only this machine gets answers (403 to others), even if the process was
    bound elsewhere by hand (``uvicorn --host``)."""

    def __init__(self, app: ASGIApp, open_access: bool) -> None:
        self.app = app
        self.open_access = open_access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.open_access:
            client = (scope.get("client") or ("",))[0] or ""
            if _is_ip(client) and not is_loopback(client):
                answer = JSONResponse(errors.body("forbidden", "this server has no API keys configured and only "
                                                  "answers on loopback"), status_code=403)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Counts answered requests by route template, method and status, and their latency."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        answered = StatusRecorder(send, 0)
        await self.app(scope, receive, answered)
        route = getattr(scope.get("route"), "path", "other")
        self.requests.labels(route, scope["method"], str(answered.status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - start)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.main:app` builds the app on first access (importing the module needs no settings)
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
