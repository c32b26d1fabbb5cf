"""Our own job records in Redis: request, progress, outcome, archive. No torch here.

RQ runs jobs; these hashes say what the caller sees. They live beside RQ's keys because
RQ rewrites its job hash (meta included) whenever it saves a job, and because a job's public
outcome (canceled, archive digest) is ours, not RQ's.

Keys::

    distill:job:<id>         hash   request, timestamps, progress, outcome, archive, error
    distill:jobs             zset   job ids by creation time (listing)
    distill:worker:<name>    hash   one worker's status, expires when it stops beating
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from redis import Redis
from redis.typing import EncodableT, FieldT

JOB_KEY = "distill:job:{}"
JOBS_INDEX = "distill:jobs"
WORKER_KEY = "distill:worker:{}"
WORKER_PATTERN = "distill:worker:*"

SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
DEFAULT_TTL = 7 * 24 * 3600


def job_key(job_id: str) -> str:
    return JOB_KEY.format(job_id)


def archive_path(data_dir: Path, job_id: str) -> Path:
    """Where a finished job's archive lives."""
    return Path(data_dir) / f"{job_id}.zip"


def partial_path(data_dir: Path, job_id: str) -> Path:
    """Where a running job writes; never served, removed on failure or cancel."""
    return Path(data_dir) / f".{job_id}.zip.part"


def create(redis: Redis, job_id: str, *, request: Mapping[str, Any], total: int, ttl: int) -> float:
    """Record a newly accepted job; ``ttl`` is how long it is kept once finished."""
    now = time.time()
    with redis.pipeline() as pipe:
        pipe.hset(
            job_key(job_id),
            mapping={
                "request": json.dumps(request, separators=(",", ":")),
                "created_at": repr(now),
                "total": total,
                "generated": 0,
                "written": 0,
                "ttl": ttl,
            },
        )
        pipe.zadd(JOBS_INDEX, {job_id: now})
        pipe.zremrangebyscore(JOBS_INDEX, 0, now - ttl)
        pipe.execute()
    return now


def read(redis: Redis, job_id: str) -> dict[str, str]:
    """The record's fields as text; empty when the job is unknown or expired."""
    raw: dict[bytes, bytes] = redis.hgetall(job_key(job_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def mark_started(redis: Redis, job_id: str, *, worker: str, partial: Path) -> None:
    """The job runs on ``worker``, writing to ``partial`` (removed by whoever fails the job)."""
    redis.hset(
        job_key(job_id),
        mapping={
            "started_at": repr(time.time()),
            "worker": worker,
            "partial": str(partial),
            "generated": 0,
            "written": 0,
        },
    )


def save_progress(redis: Redis, job_id: str, *, generated: int, written: int) -> None:
    redis.hset(
        job_key(job_id),
        mapping={"generated": generated, "written": written, "updated_at": repr(time.time())},
    )


def request_cancel(redis: Redis, job_id: str) -> None:
    redis.hset(job_key(job_id), "cancel_requested", "1")


def cancel_requested(redis: Redis, job_id: str) -> bool:
    return bool(redis.hexists(job_key(job_id), "cancel_requested"))


def finish(
    redis: Redis,
    job_id: str,
    *,
    outcome: str,
    fields: Mapping[str, str | int | float] | None = None,
) -> bool:
    """Record a terminal outcome once; returns False when one was already recorded.

    The record then expires after the ttl it was created with.
    """
    key = job_key(job_id)
    if not redis.hsetnx(key, "outcome", outcome):
        return False
    ttl = int(redis.hget(key, "ttl") or DEFAULT_TTL)
    with redis.pipeline() as pipe:
        mapping: dict[FieldT, EncodableT] = {"finished_at": repr(time.time())}
        mapping.update(fields or {})
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, ttl)
        pipe.execute()
    return True
