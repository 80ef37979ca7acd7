from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Prometheus: jobs by status, queue depth, stage latencies, cache hits/misses, HTTP requests."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
