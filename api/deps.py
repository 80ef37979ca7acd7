"""What routes get injected: one :class:`Services` per app (built at start-up), the tenant."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from celery import Celery
from fastapi import Depends, Request

from api.errors import ApiError
from msam_service.auth import tenant_for
from msam_service.jobs import JobStore
from msam_service.metrics import GaugeSource, RedisMetrics
from msam_service.settings import Settings
from msam_service.storage import Storage


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    storage: Storage
    queue: Celery
    metrics: RedisMetrics
    gauges: GaugeSource
    keys: dict[str, str] = field(default_factory=dict)  # sha256(key) -> tenant (msam_service.auth)


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def tenant(request: Request, svc: Services = Depends(services)) -> str:
    """The caller's tenant: ``public`` without configured keys (loopback only), else the tenant
    whose hashed key matches the bearer key. Also kept for the audit line."""
    if not svc.keys:
        request.state.tenant = "public"
        return "public"
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    who = tenant_for(token, svc.keys)
    if who is None:
        raise ApiError(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    request.state.tenant = who
    return who


def base_url(request: Request, svc: Services = Depends(services)) -> str:
    return (svc.settings.public_url or str(request.base_url)).rstrip("/")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers


def json_body(request: Request) -> None:
    """A route whose body is JSON: a body sent as anything else is a 415 that says what to send
    (FastAPI would read it as text and answer a 422 about a missing object). No body: nothing to
    check (the route's own defaults apply)."""
    media = _media_type(request)
    if _has_body(request) and media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as JSON with the header 'Content-Type: application/json' (got "
                       f"{repr(media) if media else 'no Content-Type'}; curl: -H 'Content-Type: application/json')")


def multipart_body(request: Request) -> None:
    """A route that takes files: anything but multipart/form-data is a 415 that says how to send them."""
    media = _media_type(request)
    if media != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with the image file in the field 'image' (got "
                       f"{repr(media) if media else 'no Content-Type'}; curl: -F image=@ct.nii.gz)")
