from __future__ import annotations

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.deps import Services, services
from api.schemas import Health, Readiness
from msam_service.queue import live_workers

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The API process is up (liveness)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(svc: Services = Depends(services)) -> JSONResponse:
    """Ready to take jobs: Redis reachable, a worker alive, and its model available.
    503 says why not."""
    reasons: list[str] = []
    workers = 0
    try:
        svc.redis.ping()
        ok_redis = True
    except redis.RedisError as exc:
        ok_redis = False
        reasons.append(f"redis unreachable ({type(exc).__name__})")
    if ok_redis:
        problems = []
        for info in live_workers(svc.redis):
            problem = info.get("checkpoint_error") or info.get("model_error") or ""
            if problem:
                problems.append(problem)
            else:
                workers += 1
        if workers == 0:
            reasons.extend(sorted(set(problems)) or ["no worker alive (start one: celery -A worker.celery_app worker)"])
    body = Readiness(ready=not reasons, redis=ok_redis, workers=workers, reasons=reasons)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
