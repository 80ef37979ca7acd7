"""What routes get injected: one :class:`Services` per app (built at start-up), the tenant."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import redis
from celery import Celery
from fastapi import Depends, Request

from api.errors import ApiError
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


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def tenant(request: Request, svc: Services = Depends(services)) -> str:
    """The caller's tenant: ``public`` without configured keys, else derived from the bearer key
    (a digest, so keys never reach Redis or logs). Per-tenant key files: issue #7."""
    keys = svc.settings.key_list()
    if not keys:
        return "public"
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.strip(), k) for k in keys):
        raise ApiError(401, "unauthorized", "unknown API key")
    return "key-" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]


def base_url(request: Request, svc: Services = Depends(services)) -> str:
    return (svc.settings.public_url or str(request.base_url)).rstrip("/")
