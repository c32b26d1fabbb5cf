"""Liveness, readiness and metrics (outside /v1: probes and scrapers call them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import health
from service.auth import owner_for
from service.deps import RedisDep, SettingsDep
from service.schemas import Health, Readiness

router = APIRouter()


@router.get(
    "/metrics",
    dependencies=[Depends(owner_for)],
    operation_id="metrics",
    tags=["health"],
    summary="Prometheus metrics for the whole service (all workers)",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", operation_id="health", tags=["health"], summary="The API process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readiness",
    tags=["health"],
    summary="Redis reachable and a worker with its model loaded",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; `detail` says why"}},
)
def readyz(redis: RedisDep, settings: SettingsDep) -> Response:
    state = health.readiness(redis, settings)
    code = 200 if state.status == "ready" else 503
    return JSONResponse(state.model_dump(mode="json"), status_code=code)
