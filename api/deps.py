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
