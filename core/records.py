"""Our own job records in Redis: request, progress, outcome, archive. No torch here.

RQ runs jobs; these hashes say what the caller sees. They live beside RQ's keys because
RQ rewrites its job hash (meta included) whenever it saves a job, and because a job's public
outcome (canceled, archive digest) is ours, not RQ's.

Keys::

    distill:job:<id>         hash   request, owner, timestamps, progress, outcome, archive, error
    distill:jobs:<owner>     zset   one owner's job ids by creation time (listing)
    distill:worker:<name>    hash   one worker's status, expires when it stops beating
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT

from core import stats

JOB_KEY = "distill:job:{}"
JOBS_INDEX = "distill:jobs:{}"
#: How long an expired job is still remembered, to answer 410 instead of 404.
TOMBSTONE_S = 30 * 24 * 3600
WORKER_KEY = "distill:worker:{}"
WORKER_PATTERN = "distill:worker:*"

SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
log = logging.getLogger("distill.jobs")
DEFAULT_TTL = 7 * 24 * 3600


def job_key(job_id: str) -> str:
    return JOB_KEY.format(job_id)


def archive_key(job_id: str) -> str:
    """The finished archive's key in the store (``DISTILL_STORAGE``)."""
    return f"{job_id}.zip"


def preview_key(job_id: str) -> str:
    """The contact sheet's key in the store."""
    return f"{job_id}.preview.png"


def partial_path(data_dir: Path, job_id: str) -> Path:
    """Where a running one-piece job writes with the default directory store (the layout
    ``worker.tasks`` uses for any key); never served, removed on failure or cancel."""
    return Path(data_dir) / f".{job_id}.zip.part"


def jobs_index(owner: str) -> str:
    return JOBS_INDEX.format(owner)


def create(
    redis: Redis,
    job_id: str,
    *,
    request: Mapping[str, Any],
    total: int,
    ttl: int,
    owner: str,
    extra: Mapping[str, str | int] | None = None,
) -> float:
    """Record a newly accepted job of ``owner``; ``ttl`` is how long it is kept once finished."""
    now = time.time()
    index = jobs_index(owner)
    mapping: dict[FieldT, EncodableT] = {
        "request": json.dumps(request, separators=(",", ":")),
        "created_at": repr(now),
        "total": total,
        "generated": 0,
        "written": 0,
        "ttl": ttl,
        "owner": owner,
    }
    mapping.update(extra or {})
    with redis.pipeline() as pipe:
        pipe.hset(job_key(job_id), mapping=mapping)
        pipe.zadd(index, {job_id: now})
        pipe.zremrangebyscore(index, 0, now - ttl - TOMBSTONE_S)
        stats.incr(pipe, "jobs_submitted")
        pipe.execute()
    log.info("job queued", extra={"job_id": job_id, "state": "queued", "images": total})
    return now


def read(redis: Redis, job_id: str) -> dict[str, str]:
    """The record's fields as text; empty when the job is unknown or expired."""
    raw: dict[bytes, bytes] = redis.hgetall(job_key(job_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def mark_started(redis: Redis, job_id: str, *, worker: str, partial: Path) -> None:
    """The job runs on ``worker``, writing to ``partial`` (removed by whoever fails the job)."""
    now = time.time()
    created = redis.hget(job_key(job_id), "created_at")
    with redis.pipeline() as pipe:
        pipe.hset(
            job_key(job_id),
            mapping={
                "started_at": repr(now),
                "worker": worker,
                "partial": str(partial),
                "generated": 0,
                "written": 0,
            },
        )
        pipe.hincrby(job_key(job_id), "attempts", 1)
        wait = max(now - float(created), 0.0) if created is not None else None
        if wait is not None:
            stats.observe(pipe, "queue_wait", wait)
        pipe.execute()
    log.info(
        "job running",
        extra={"job_id": job_id, "state": "running", "worker": worker, "queue_wait_s": wait},
    )


def requeued(redis: Redis, job_id: str, *, reason: str) -> None:
    """The job goes back to the queue (its worker died or shut down); progress starts over."""
    with redis.pipeline() as pipe:
        pipe.hdel(job_key(job_id), "started_at", "partial")
        pipe.hset(
            job_key(job_id), mapping={"generated": 0, "written": 0, "last_interruption": reason}
        )
        stats.incr(pipe, "jobs_requeued")
        pipe.execute()
    log.warning("job requeued", extra={"job_id": job_id, "state": "queued", "reason": reason})


def save_progress(
    redis: Redis, key: str, *, generated: int, written: int, added: tuple[int, int]
) -> None:
    """Totals so far into hash ``key`` (a job's record, or a shard's); ``added`` =
    (generated, written) since the last call, for the counters."""
    with redis.pipeline() as pipe:
        pipe.hset(
            key,
            mapping={"generated": generated, "written": written, "updated_at": repr(time.time())},
        )
        stats.incr(pipe, "images_generated", added[0])
        stats.incr(pipe, "images_written", added[1])
        pipe.execute()


def expired(record: Mapping[str, str], now: float | None = None) -> bool:
    """True once a finished job is past its retention."""
    expires = record.get("expires_at")
    return expires is not None and float(expires) <= (now or time.time())


def request_cancel(redis: Redis, job_id: str) -> None:
    redis.hset(job_key(job_id), "cancel_requested", "1")


def cancel_requested(redis: Redis, job_id: str) -> bool:
    return bool(redis.hexists(job_key(job_id), "cancel_requested"))


def ending_record(record: Mapping[str, str]) -> bool:
    """Canceled, or already ended (a sharded job another shard failed): stop working on it."""
    return "cancel_requested" in record or "outcome" in record


def ending(redis: Redis, job_id: str) -> bool:
    cancel, outcome = redis.hmget(job_key(job_id), ["cancel_requested", "outcome"])
    return cancel is not None or outcome is not None


def finish(
    redis: Redis,
    job_id: str,
    *,
    outcome: str,
    fields: Mapping[str, str | int | float] | None = None,
) -> bool:
    """Record a terminal outcome once; returns False when one was already recorded.

    The job (and its archive) expire ``ttl`` seconds later (``expires_at``); the record stays
    as a tombstone for ``TOMBSTONE_S`` more, so callers get 410 rather than 404.
    """
    key = job_key(job_id)
    # One transaction: readers never see the outcome without its fields (an archive, say).
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                if pipe.hexists(key, "outcome"):
                    pipe.reset()
                    return False
                now = time.time()
                ttl_raw, started_raw, written_raw, callback, hook_queue, hook_retry, shard_count = (
                    pipe.hmget(
                        key,
                        [
                            "ttl",
                            "started_at",
                            "written",
                            "callback_url",
                            "webhook_queue",
                            "webhook_retry_seconds",
                            "shards",
                        ],
                    )
                )
                seconds = max(now - float(started_raw), 1e-6) if started_raw is not None else None
                ttl = int(ttl_raw or DEFAULT_TTL)
                mapping: dict[FieldT, EncodableT] = {
                    "outcome": outcome,
                    "finished_at": repr(now),
                    "expires_at": repr(now + ttl),
                }
                mapping.update(fields or {})
                pipe.multi()
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, ttl + TOMBSTONE_S)
                if shard_count is not None:
                    from core import shards  # a sharded job's bookkeeping goes with its record

                    shards.expire_with_job(pipe, job_id, int(shard_count), ttl + TOMBSTONE_S)
                stats.incr(pipe, f"jobs_{outcome}")
                if seconds is not None:
                    stats.observe(pipe, "job_duration", seconds)
                    written = int((fields or {}).get("written", written_raw or 0))
                    if outcome == SUCCEEDED:
                        pipe.hset(
                            stats.LAST_JOB,
                            mapping={
                                "images_per_second": written / seconds,
                                "seconds": seconds,
                                "images": written,
                                "finished_at": repr(now),
                            },
                        )
                pipe.execute()
                break
            except WatchError:
                continue  # the record changed (progress, a cancel flag): read it again
    if callback and hook_queue:
        from core import webhooks  # the event goes out from the webhook worker, not from here

        webhooks.enqueue(
            redis,
            job_id,
            queue=hook_queue.decode() if isinstance(hook_queue, bytes) else str(hook_queue),
            retry_seconds=int(hook_retry or 3600),
            ttl=int(ttl_raw or DEFAULT_TTL),
        )
    details = {k: v for k, v in (fields or {}).items() if k.startswith(("error_", "archive_"))}
    log.log(
        logging.WARNING if outcome == FAILED else logging.INFO,
        f"job {outcome}",
        extra={"job_id": job_id, "state": outcome, "seconds": seconds, **details},
    )
    return True
