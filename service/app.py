"""``create_app()``: the FastAPI application, its Redis pool, routes and error handlers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from core import maintenance, models
from core.settings import Settings, get_settings
from service import errors
from service.guards import BodyGuard
from service.metrics import registry_for
from service.routes import evaluations, health, jobs, presets, references, ui
from service.routes import models as model_routes
from service.timing import ServerTiming

DESCRIPTION = """\
Generates distilled image datasets on demand: class names in, a zipped ImageFolder out.
Each class name becomes a text prompt, SDXL-Turbo samples images in one step, they are shrunk
to the requested size and multiplied with post-generation augmentation.

Jobs are asynchronous: `POST /v1/jobs` answers 202 with a `Location`; poll it until `state`
is terminal, then download `archive.url`. Errors are `application/problem+json`.
"""


def telemetry_config() -> TelemetryConfig:
    """FastAPI's OpenTelemetry hooks cost every request about 0.1 ms of CPU even when no
    provider is configured (bench/loadtest.py): they are on only where the environment
    configures OpenTelemetry (any ``OTEL_*`` variable, as ``opentelemetry-instrument`` sets)."""
    on = any(name.startswith("OTEL_") for name in os.environ)
    return TelemetryConfig(tracing=on, metrics=on, logs=on, operation_spans=on)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; ``settings`` defaults to the environment's."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeouts: dict[str, Any] = {
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
            "health_check_interval": 30,
        }
        app.state.redis = Redis.from_url(settings.redis_url, **timeouts)
        app.state.async_redis = AsyncRedis.from_url(settings.redis_url, **timeouts)
        app.state.metrics = registry_for(app.state.redis, settings)
        # Reaping and tending happen here too, so they go on while every worker is busy or
        # gone; a lock in Redis keeps it to one process at a time (core/maintenance.py). One
        # loop per model: each model's queue is looked after like a deployment of its own.
        loops = [
            maintenance.Loop(app.state.redis, models.scoped(settings, entry)).start()
            for entry in models.catalogue(settings).values()
        ]
        try:
            yield
        finally:
            for loop in loops:
                loop.stop()
            app.state.redis.close()
            await app.state.async_redis.aclose()

    app = FastAPI(
        title="distill-service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        telemetry=telemetry_config(),
    )
    app.state.settings = settings
    for router in (jobs, evaluations, model_routes, presets, references, health, ui):
        app.include_router(router.router)
    errors.install(app)
    app.add_middleware(
        BodyGuard, max_bytes=settings.max_body_bytes, uploads=references.UPLOAD_PATHS
    )
    # Outermost: the time of everything the application does for a request.
    app.add_middleware(ServerTiming)
    return app
