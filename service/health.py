"""Liveness and readiness: is Redis there, and has a worker with its model loaded beaten lately."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis

from core import models
from core import workers as core_workers
from core.oversample import CLIP_PART, SCORERS
from core.settings import Settings
from core.soft_labels import TEACHER_PART_PREFIX
from core.storage import StorageError, open_storage
from service.schemas import ModelInfo, ModelList, Readiness, WorkerStatus


def workers(redis: Redis, settings: Settings) -> list[WorkerStatus]:
    """Every model's workers that sent a heartbeat within ``DISTILL_HEARTBEAT_TTL`` seconds."""
    now = time.time()
    return [
        WorkerStatus(
            name=w.name,
            state=w.state,
            model=w.model,
            alias=alias,
            device=w.device,
            images_per_second=(
                round(w.images_per_second, 2) if w.images_per_second is not None else None
            ),
            current_job=w.current_job,
            seconds_since_heartbeat=round(w.age(now), 2),
            batch_size=w.batch_size,
            decoders=list(w.decoders),
            scorers=list(w.scorers),
            teachers=sorted(w.teachers),
            compile=w.compile,
            compile_seconds=w.compile_seconds,
            unavailable=dict(w.unavailable),
        )
        for alias, entry in models.catalogue(settings).items()
        for w in core_workers.live(redis, entry.queue, heartbeat_ttl=settings.heartbeat_ttl)
    ]


def ready_per_model(seen: list[WorkerStatus], settings: Settings) -> dict[str, int]:
    """Ready workers per served alias (0 for a model nobody serves now)."""
    counts = dict.fromkeys(models.catalogue(settings), 0)
    for w in seen:
        if w.state == "ready" and w.alias in counts:
            counts[w.alias] += 1
    return counts


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
    per_model = ready_per_model(seen, settings)
    if loaded:
        idle = [alias for alias, n in per_model.items() if n == 0]
        return Readiness(
            status="ready",
            redis="ok",
            storage=storage,
            workers=seen,
            models=per_model,
            detail=f"{len(loaded)} worker(s) ready"
            + (f"; no worker serves {', '.join(idle)} yet: its jobs wait" if idle else ""),
        )
    loading = len(seen)
    detail = (
        f"no worker has its model loaded yet ({loading} loading)"
        if loading
        else "no worker has sent a heartbeat recently"
    )
    return Readiness(
        status="unavailable",
        redis="ok",
        storage=storage,
        workers=seen,
        models=per_model,
        detail=detail,
    )


def optional_parts(seen: list[WorkerStatus], alias: str) -> dict[str, Any]:
    """The decoders, select scorers and teachers some ready worker of ``alias`` has, and the
    parts none has (with the first reason a worker gave)."""
    ready = [w for w in seen if w.state == "ready" and w.alias == alias]
    decoders = sorted({d for w in ready for d in w.decoders}, key=("vae", "tiny").index)
    scorers = sorted({s for w in ready for s in w.scorers}, key=SCORERS.index)
    unavailable: dict[str, str] = {}
    for w in ready:
        for part, why in w.unavailable.items():
            unavailable.setdefault(part, why)
    if "tiny" in decoders:
        unavailable.pop("tiny_decoder", None)
    if "clip" in scorers:
        unavailable.pop(CLIP_PART, None)
    teachers = sorted({t for w in ready for t in w.teachers})
    for name in teachers:
        unavailable.pop(f"{TEACHER_PART_PREFIX}{name}", None)
    return {
        "decoders": decoders,
        "scorers": scorers,
        "teachers": teachers,
        "unavailable": unavailable,
    }


def model_list(redis: Redis, settings: Settings) -> ModelList:
    """``GET /v1/models``: each served model, its defaults and its ready workers."""
    seen = workers(redis, settings)
    ready = ready_per_model(seen, settings)
    served = models.catalogue(settings)
    rows = []
    for n, (alias, entry) in enumerate(served.items()):
        licence = models.licence_of(entry.id)
        rows.append(
            ModelInfo(
                alias=alias,
                id=entry.id,
                family=entry.family,
                pipeline=entry.pipeline,
                conditioning="class" if entry.class_conditional else "text",
                resolution=entry.defaults.resolution,
                steps=entry.defaults.steps,
                guidance_scale=entry.defaults.guidance_scale,
                licence=licence.name or licence.id if licence else None,
                default=n == 0,
                ready_workers=ready[alias],
                **optional_parts(seen, alias),
            )
        )
    return ModelList(models=rows)
