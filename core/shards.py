"""Sharded jobs: one large fixed-ipc job split across every worker. No torch here.

A job with more than ``DISTILL_SHARD_IMAGES`` output images is cut into shards: contiguous
runs of its sampled images in class-major order (so a shard is a range of classes, or a
range of images within a class when a job has few classes). Each shard is its own RQ job
(``worker.tasks.distill_shard``) that writes a part archive to the store; when the last shard
is done, one assembly job (``worker.tasks.assemble``) copies the parts, in shard order, into
the job's archive. The caller sees one job throughout.

Same dataset whatever the parallelism: shard boundaries depend only on the request,
``DISTILL_SHARD_IMAGES`` and the batch size, never on how many workers there are, and they
fall on multiples of the batch size, so every pipeline call holds the same images as when
one worker makes the whole job in one piece. Image seeds depend only on (seed, class,
number). So the parts concatenate to exactly the archive an unsharded run writes.

Fairness: a job never has more shards waiting or running than there are ready workers (its
*window*). A finishing shard enqueues the job's next one at the back of the queue, behind
whatever arrived meanwhile, so a small job submitted behind a 50,000-image job waits for
about one shard, not for the whole job, and several large jobs take turns shard by shard.

Keys::

    distill:job:<id>            the job's hash; ``shards`` (count), ``shards_enqueued``
    distill:shard:<id>:<k>      one shard: start, stop, images, state, worker, progress, times
    distill:shards-done:<id>    set of finished shard indexes
    distill:sharded             set of jobs with shards in flight (the sweep looks here)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from core import queueing, records, stats
from core.spec import DatasetSpec

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger("distill.jobs")

SHARD_KEY = "distill:shard:{}:{}"
DONE_KEY = "distill:shards-done:{}"
ACTIVE = "distill:sharded"
SHARD_TASK = "worker.tasks.distill_shard"
ASSEMBLE_TASK = "worker.tasks.assemble"
CLEANUP_TASK = "worker.tasks.discard_parts"
ON_FAILURE = "core.failures.on_shard_failure"
#: More shards than this and each one grows instead (bookkeeping stays small).
MAX_SHARDS = 1000

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"


@dataclass(frozen=True)
class Shard:
    """Sampled images ``start..stop-1`` of the job's class-major plan, and their output count."""

    index: int
    start: int
    stop: int
    images: int


def shard_key(job_id: str, index: int) -> str:
    return SHARD_KEY.format(job_id, index)


def shard_job_id(job_id: str, index: int) -> str:
    """The RQ job id of one shard."""
    return f"{job_id}-s{index:04d}"


def assemble_job_id(job_id: str) -> str:
    return f"{job_id}-assemble"


def part_key(job_id: str, index: int) -> str:
    """Where a shard's part archive lives in the store."""
    return f"parts/{job_id}/{index:04d}.zip"


def parts_prefix(job_id: str) -> str:
    return f"parts/{job_id}/"


def images_in(spec: DatasetSpec, start: int, stop: int) -> int:
    """Output images (sampled + copies) that sampled images ``start..stop-1`` become."""
    per_sample = spec.augment.n_copies + 1
    per_class = spec.generated_per_class
    ipc = spec.ipc or 0
    total = 0
    for position in range(start, stop):
        first = (position % per_class) * per_sample
        total += min(per_sample, ipc - first)
    return total


def plan(spec: DatasetSpec, *, shard_images: int, batch_size: int) -> list[Shard]:
    """The job's shards; empty when it runs in one piece (small, or a time-budget job).

    Shards are balanced and each starts on a multiple of ``batch_size``.
    """
    if spec.budget_seconds is not None or spec.total_images <= shard_images:
        return []
    samples = spec.total_generated
    per_sample = spec.augment.n_copies + 1
    target = max(shard_images // per_sample, 1)
    count = min(math.ceil(samples / target), MAX_SHARDS)
    size = math.ceil(math.ceil(samples / count) / batch_size) * batch_size
    count = math.ceil(samples / size)
    if count < 2:
        return []
    return [
        Shard(
            k,
            k * size,
            min((k + 1) * size, samples),
            images_in(spec, k * size, min((k + 1) * size, samples)),
        )
        for k in range(count)
    ]


def describe(spec: DatasetSpec, shard: Mapping[str, Any]) -> tuple[int, int]:
    """The class indexes (first, last) a shard covers."""
    per_class = spec.generated_per_class
    return int(shard["start"]) // per_class, (int(shard["stop"]) - 1) // per_class


def create(redis: Redis, job_id: str, shards: list[Shard], *, queue: str) -> None:
    """Record a sharded job's shards, run from ``queue`` (call before enqueuing any)."""
    with redis.pipeline() as pipe:
        pipe.hset(
            records.job_key(job_id),
            mapping={"shards": len(shards), "shards_enqueued": 0, "queue": queue},
        )
        for shard in shards:
            pipe.hset(
                shard_key(job_id, shard.index),
                mapping={
                    "index": shard.index,
                    "start": shard.start,
                    "stop": shard.stop,
                    "images": shard.images,
                    "state": QUEUED,
                    "generated": 0,
                    "written": 0,
                    "attempts": 0,
                },
            )
        pipe.sadd(ACTIVE, job_id)
        pipe.execute()


def read_all(redis: Redis, job_id: str, count: int) -> list[dict[str, str]]:
    """Every shard's hash, in index order."""
    with redis.pipeline(transaction=False) as pipe:
        for index in range(count):
            pipe.hgetall(shard_key(job_id, index))
        rows: list[dict[bytes, bytes]] = pipe.execute()
    return [{k.decode(): v.decode() for k, v in row.items()} for row in rows]


def read(redis: Redis, job_id: str, index: int) -> dict[str, str]:
    raw: dict[bytes, bytes] = redis.hgetall(shard_key(job_id, index))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def ready_workers(redis: Redis, *, heartbeat_ttl: float, queue: str) -> int:
    """Workers on ``queue`` with a loaded model that beat within ``heartbeat_ttl`` seconds."""
    now = time.time()
    count = 0
    for key in redis.scan_iter(match=records.WORKER_PATTERN, count=100):
        state, beat, their_queue = redis.hmget(key, ["state", "last_heartbeat", "queue"])
        if (
            state == b"ready"
            and their_queue == queue.encode()
            and beat is not None
            and now - float(beat) <= heartbeat_ttl
        ):
            count += 1
    return count


def top_up(redis: Redis, settings: Settings, job_id: str) -> int:
    """Enqueue the job's next shards until its window (ready workers) is full.

    Returns how many were enqueued. Safe to call from anywhere, any number of times.
    """
    window = max(
        ready_workers(redis, heartbeat_ttl=settings.heartbeat_ttl, queue=settings.queue_name), 1
    )
    queue = Queue(settings.queue_name, connection=redis)
    key = records.job_key(job_id)
    added = 0
    while True:
        total, enqueued, outcome, cancel, owner = redis.hmget(
            key, ["shards", "shards_enqueued", "outcome", "cancel_requested", "owner"]
        )
        if total is None or outcome is not None or cancel is not None:
            return added
        done = int(redis.scard(DONE_KEY.format(job_id)))
        if int(enqueued or 0) >= int(total) or int(enqueued or 0) - done >= window:
            return added
        index = int(redis.hincrby(key, "shards_enqueued", 1)) - 1
        if index >= int(total):
            return added
        queue.enqueue(
            SHARD_TASK,
            job_id,
            index,
            job_id=shard_job_id(job_id, index),
            description=f"distill {job_id} shard {index}",
            **queueing.enqueue_options(settings, on_failure=ON_FAILURE),
        )
        # Behind whatever other callers queued meanwhile (worker/queueing.py).
        who = owner.decode() if isinstance(owner, bytes) else str(owner or "")
        queueing.place(redis, queue.key, shard_job_id(job_id, index), who)
        added += 1


def mark_running(redis: Redis, job_id: str, index: int, *, worker: str, partial: Path) -> None:
    """The shard runs on ``worker``, writing ``partial`` (removed by whoever fails it)."""
    now = time.time()
    key = records.job_key(job_id)
    created = redis.hget(key, "created_at")
    with redis.pipeline() as pipe:
        pipe.hset(
            shard_key(job_id, index),
            mapping={
                "state": RUNNING,
                "worker": worker,
                "partial": str(partial),
                "started_at": repr(now),
                "generated": 0,
                "written": 0,
            },
        )
        pipe.hdel(shard_key(job_id, index), "finished_at")
        pipe.hincrby(shard_key(job_id, index), "attempts", 1)
        pipe.hsetnx(key, "started_at", repr(now))
        if index == 0 and created is not None:
            stats.observe(pipe, "queue_wait", max(now - float(created), 0.0))
        pipe.execute()
    log.info(
        "shard running",
        extra={"job_id": job_id, "shard": index, "state": RUNNING, "worker": worker},
    )


def mark_requeued(redis: Redis, job_id: str, index: int, *, reason: str) -> None:
    """The shard goes back to the queue (its worker died or shut down); it starts over."""
    with redis.pipeline() as pipe:
        pipe.hset(
            shard_key(job_id, index),
            mapping={"state": QUEUED, "generated": 0, "written": 0, "last_interruption": reason},
        )
        pipe.hdel(shard_key(job_id, index), "started_at")
        stats.incr(pipe, "jobs_requeued")
        pipe.execute()
    log.warning(
        "shard requeued",
        extra={"job_id": job_id, "shard": index, "state": QUEUED, "reason": reason},
    )


def mark_done(
    redis: Redis, job_id: str, index: int, *, fields: Mapping[str, str | int | float]
) -> None:
    """The shard's part is in the store."""
    mapping: dict[FieldT, EncodableT] = {"state": SUCCEEDED, "finished_at": repr(time.time())}
    mapping.update(fields)
    with redis.pipeline() as pipe:
        pipe.hset(shard_key(job_id, index), mapping=mapping)
        pipe.sadd(DONE_KEY.format(job_id), index)
        pipe.execute()
    log.info("shard succeeded", extra={"job_id": job_id, "shard": index, "state": SUCCEEDED})


def mark_stopped(
    redis: Redis, job_id: str, index: int, *, state: str, error: str | None = None
) -> None:
    """The shard ended without a part (canceled, or failed with ``error``)."""
    mapping: dict[FieldT, EncodableT] = {"state": state, "finished_at": repr(time.time())}
    if error:
        mapping["error"] = error[:2000]
    redis.hset(shard_key(job_id, index), mapping=mapping)


def maybe_assemble(redis: Redis, settings: Settings, job_id: str) -> bool:
    """Enqueue the assembly once every shard is done; True if this call enqueued it.

    A transaction: the claim and the enqueue land together or not at all, so a worker that
    dies between a shard's end and this call leaves nothing half-done (``tend`` calls it again).
    """
    key = records.job_key(job_id)
    done_key = DONE_KEY.format(job_id)
    queue = Queue(settings.queue_name, connection=redis)
    with redis.pipeline() as pipe:
        try:
            pipe.watch(key, done_key)  # type: ignore[no-untyped-call]
            total, claimed, outcome = pipe.hmget(key, ["shards", "assembly", "outcome"])
            if total is None or claimed is not None or outcome is not None:
                return False
            if int(pipe.scard(done_key)) < int(total):
                return False
            options = queueing.enqueue_options(settings, on_failure=ON_FAILURE)
            job = queue.create_job(
                ASSEMBLE_TASK,
                args=(job_id,),
                job_id=assemble_job_id(job_id),
                description=f"assemble {job_id}",
                timeout=options.pop("job_timeout"),
                **options,
            )
            pipe.multi()
            pipe.hset(key, "assembly", QUEUED)
            # At the front: every image is made, only the archive is missing.
            queue.enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()
        except WatchError:
            return False
    log.info("job assembling", extra={"job_id": job_id, "state": RUNNING})
    return True


def _cancel_rq(redis: Redis, rq_id: str) -> bool:
    """Cancel an RQ job that has not started; False when it is running (or gone)."""
    try:
        job = Job.fetch(rq_id, connection=redis)
    except NoSuchJobError:
        return True
    status = job.get_status()
    if status == JobStatus.STARTED:
        return False
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        try:
            job.cancel()
        except InvalidJobOperation:
            return job.get_status() != JobStatus.STARTED
    return True


def stop_all(redis: Redis, job_id: str) -> int:
    """Cancel every shard (and the assembly) that has not started; returns how many still run.

    Running shards see the job's cancel flag (or outcome) between batches and stop themselves.
    """
    total_raw = redis.hget(records.job_key(job_id), "shards")
    if total_raw is None:
        return 0
    running = 0
    rows = read_all(redis, job_id, int(total_raw))
    for index, row in enumerate(rows):
        if row.get("state") in (SUCCEEDED, FAILED, CANCELED):
            continue
        if _cancel_rq(redis, shard_job_id(job_id, index)):
            if row.get("state") != RUNNING:
                mark_stopped(redis, job_id, index, state=CANCELED)
            else:
                running += 1
        else:
            running += 1
    if not _cancel_rq(redis, assemble_job_id(job_id)):
        running += 1
    return running


def still_running(redis: Redis, job_id: str) -> bool:
    """True while any shard of the job (or its assembly) is running."""
    total_raw, assembly = redis.hmget(records.job_key(job_id), ["shards", "assembly"])
    if assembly == RUNNING.encode():
        return True
    count = int(total_raw or 0)
    return any(row.get("state") == RUNNING for row in read_all(redis, job_id, count))


def end_if_stopped(redis: Redis, job_id: str) -> bool:
    """Once no shard of a canceled job runs, record it canceled. True when the job has ended
    (canceled, or failed by a shard) and nothing runs: its parts can go."""
    if still_running(redis, job_id):
        return False
    record = records.read(redis, job_id)
    if "outcome" in record:
        return True
    if "cancel_requested" not in record:
        return False
    records.finish(redis, job_id, outcome=records.CANCELED)  # once, whoever gets here first
    return True


def forget(redis: Redis, job_id: str) -> None:
    """The job ended: the sweep no longer needs to look at it."""
    redis.srem(ACTIVE, job_id)


def active(redis: Redis) -> list[str]:
    members: set[bytes] = redis.smembers(ACTIVE)  # type: ignore[assignment]
    return sorted(m.decode() for m in members)


def expire_with_job(pipe: Pipeline, job_id: str, count: int, seconds: int) -> None:
    """Shard bookkeeping lives as long as the job's record (queued on ``pipe``)."""
    for index in range(count):
        pipe.expire(shard_key(job_id, index), seconds)
    pipe.expire(DONE_KEY.format(job_id), seconds)
    pipe.srem(ACTIVE, job_id)


def enqueue_cleanup(redis: Redis, queue_name: str, job_id: str) -> None:
    """Have a worker remove a failed or canceled job's parts from the store (the process
    that notices the end, the API say, may not reach the store)."""
    Queue(queue_name, connection=redis).enqueue(
        CLEANUP_TASK,
        job_id,
        job_id=f"{job_id}-cleanup",
        at_front=True,
        result_ttl=600,
        failure_ttl=3600,
        description=f"remove the parts of {job_id}",
    )


def tend(redis: Redis, settings: Settings) -> None:
    """Look after every sharded job in flight (workers call this every few seconds).

    Only jobs of this worker's queue. Fills each job's window (workers may have joined),
    enqueues an assembly that a dead worker missed, and ends a canceled job whose shards have
    all stopped.
    """
    for job_id in active(redis):
        record = records.read(redis, job_id)
        if not record or "outcome" in record:
            redis.srem(ACTIVE, job_id)
            continue
        if record.get("queue") != settings.queue_name:
            continue  # another deployment's job (its own workers look after it)
        if records.ending_record(record):
            if end_if_stopped(redis, job_id):
                enqueue_cleanup(redis, settings.queue_name, job_id)
            continue
        top_up(redis, settings, job_id)
        maybe_assemble(redis, settings, job_id)
