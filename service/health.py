"""Liveness and readiness: is Redis there, and has a worker with its model loaded beaten lately."""

from __future__ import annotations

import time

from redis import Redis

from core import workers as core_workers
from core.settings import Settings
from core.storage import StorageError, open_storage
from service.schemas import Readiness, WorkerStatus


def workers(redis: Redis, settings: Settings) -> list[WorkerStatus]:
    """This queue's workers that sent a heartbeat within ``DISTILL_HEARTBEAT_TTL`` seconds."""
    now = time.time()
    return [
        WorkerStatus(
            name=w.name,
            state=w.state,
            model=w.model,
            device=w.device,
            images_per_second=(
                round(w.images_per_second, 2) if w.images_per_second is not None else None
            ),
            current_job=w.current_job,
            seconds_since_heartbeat=round(w.age(now), 2),
            batch_size=w.batch_size,
            decoders=list(w.decoders),
            compile=w.compile,
            compile_seconds=w.compile_seconds,
        )
        for w in core_workers.live(redis, settings.queue_name, heartbeat_ttl=settings.heartbeat_ttl)
    ]


#: How long one answer about the archive store is reused (probes come every few seconds).
STORE_CHECK_TTL_S = 10.0
_store_checks: dict[str, tuple[float, str]] = {}


def store_status(settings: Settings) -> str:
    """``ok``, or why the archive store (``DISTILL_STORAGE``) cannot be used."""
    try:
        store = open_storage(settings)
    except StorageError as exc:
        return f"unusable: {exc}"
    # The same bucket URL can be another store at another endpoint.
    key = f"{store.url} {settings.s3_endpoint_url}"
    cached = _store_checks.get(key)
    if cached is not None and time.monotonic() - cached[0] < STORE_CHECK_TTL_S:
        return cached[1]
    answer = "ok"
    try:
        store.check()
    except StorageError as exc:
        answer = f"unreachable: {exc}"
    _store_checks[key] = (time.monotonic(), answer)
    return answer


def readiness(redis: Redis, settings: Settings) -> Readiness:
    """Ready when Redis answers, the archive store is usable and at least one worker has its
    model loaded."""
    try:
        redis.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", said plainly
        return Readiness(
            status="unavailable",
            redis=f"unreachable: {exc}",
            workers=[],
            detail=("Redis is unreachable"),
        )
    seen = workers(redis, settings)
    storage = store_status(settings)
    if storage != "ok":
        return Readiness(
            status="unavailable",
            redis="ok",
            storage=storage,
            workers=seen,
            detail="the archive store (DISTILL_STORAGE) cannot be used",
        )
    loaded = [w for w in seen if w.state == "ready"]
    if loaded:
        return Readiness(
            status="ready",
            redis="ok",
            storage=storage,
            workers=seen,
            detail=f"{len(loaded)} worker(s) ready",
        )
    loading = len(seen)
    detail = (
        f"no worker has its model loaded yet ({loading} loading)"
        if loading
        else "no worker has sent a heartbeat recently"
    )
    return Readiness(status="unavailable", redis="ok", storage=storage, workers=seen, detail=detail)
