"""Operational endpoints, outside ``/v1`` and without auth so that probes and scrapers need no key.

``/healthz`` says the process runs (restart it if not); ``/readyz`` says it can serve (send it
traffic if so); ``/metrics`` is the Prometheus exposition.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import PlainTextResponse, Response

from encoder_service.api import metrics
from encoder_service.api.deps import ServiceDep
from encoder_service.api.problems import NO_ACTIVE_VERSION, REDIS_UNAVAILABLE, problem_responses
from encoder_service.api.responses import JSONBytesResponse
from encoder_service.api.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Response:
    """Answer while the process is up, whatever the state of Redis."""
    return JSONBytesResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=problem_responses(REDIS_UNAVAILABLE, NO_ACTIVE_VERSION),
)
async def readyz(service: ServiceDep) -> Response:
    """Answer 200 when Redis is reachable and a version is active, else 503."""
    active = await service.active_version()
    return JSONBytesResponse({"status": "ready", "active_version": active})


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics() -> Response:
    """Expose the Prometheus metrics, summed over worker processes."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
