"""Liveness and readiness: is Redis there, and has a worker with its model loaded beaten lately."""

from __future__ import annotations

import time

from redis import Redis

from core import records
from core.settings import Settings
from core.storage import StorageError, open_storage
from service.schemas import Readiness, WorkerStatus


def workers(redis: Redis, settings: Settings) -> list[WorkerStatus]:
    """Workers that sent a heartbeat within ``DISTILL_HEARTBEAT_TTL`` seconds."""
    now = time.time()
    found: list[WorkerStatus] = []
    for key in redis.scan_iter(match=records.WORKER_PATTERN, count=100):
        raw: dict[bytes, bytes] = redis.hgetall(key)  # type: ignore[assignment]
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if "last_heartbeat" not in fields:
            continue
        age = now - float(fields["last_heartbeat"])
        if age > settings.heartbeat_ttl:
            continue
        found.append(
            WorkerStatus(
                name=fields.get("name", key.decode().rsplit(":", 1)[-1]),
                state=fields.get("state", "unknown"),
                model=fields.get("model", ""),
                device=fields.get("device"),
                images_per_second=(
                    round(float(fields["images_per_second"]), 2)
                    if fields.get("images_per_second") not in (None, "", "None")
                    else None
                ),
                current_job=fields.get("current_job") or None,
                seconds_since_heartbeat=round(max(age, 0.0), 2),
            )
        )
    return sorted(found, key=lambda w: w.name)


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
