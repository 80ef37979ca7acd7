"""``GET /info``: which model answers, with which pipeline options, and what a request may hold."""

from __future__ import annotations

import json

import redis
from fastapi import APIRouter, Depends

from api.deps import Services, services
from api.errors import ApiError
from api.schemas import ErrorBody, Info, ModelOut, Prompts, PromptRules, ResultFormat, WorkerModel
from msam_service.queue import live_workers
from msam_service.settings import Settings

router = APIRouter(tags=["operations"])


def prompt_rules(settings: Settings) -> PromptRules:
    """What a request's prompts may hold: types, spaces and iterations from the
    :class:`~api.schemas.Prompts` schema itself, counts from the settings that
    :func:`api.routes.segment.check_prompt_count` enforces, so neither can drift."""
    schema = Prompts.model_json_schema()
    lesion = schema["$defs"]["Lesion"]["properties"]
    iterations = schema["properties"]["iterations"]
    return PromptRules(
        types=[name for name in ("positive", "negative", "box", "mask", "line") if name in lesion],
        spaces=list(schema["properties"]["space"]["enum"]),
        max_lesions=settings.max_lesions,
        max_points_per_lesion=settings.max_points,
        max_prompts=settings.max_prompts,
        iterations=[iterations["minimum"], iterations["maximum"]],
    )


@router.get("/info", response_model=Info, responses={503: {"model": ErrorBody}})
def info(svc: Services = Depends(services)) -> Info:
    """The models the live workers run (the checkpoint each is configured with, and the record of
    the model it loaded once it has: a worker loads it on its first job), their pipeline options,
    and the prompts and result formats a request may use."""
    workers: list[WorkerModel] = []
    try:
        for raw in live_workers(svc.redis):
            loaded = raw.get("model") or ""
            described = loaded or raw.get("checkpoint") or ""
            workers.append(WorkerModel(
                device=raw.get("device", ""), loaded=bool(loaded),
                model=ModelOut(**json.loads(described)) if described else None,
                problem=raw.get("checkpoint_error") or raw.get("model_error") or None))
    except redis.RedisError as exc:
        raise ApiError(503, "unavailable", f"redis unreachable ({type(exc).__name__}); try again shortly") from None
    models = {w.model.sha256: w.model for w in workers if w.model is not None}
    return Info(models=list(models.values()), workers=workers, prompts=prompt_rules(svc.settings),
                result_formats=list(ResultFormat.__args__))
