"""Sharded jobs: one large fixed-ipc job split across every worker. No torch here.

A job with more than ``DISTILL_SHARD_IMAGES`` output images is cut into shards: contiguous
runs of its sampled images in class-major order (so a shard is a range of classes, or a
range of images within a class when a job has few classes). Each shard is its own RQ entry
(``keys.SHARD_TASK``) that writes a part archive to the store; when the last shard is done,
one assembly entry (``keys.ASSEMBLE_TASK``) copies the parts, in shard order, into the job's
archive. The caller sees one job throughout.

Same dataset whatever the parallelism: shard boundaries depend only on the request,
``DISTILL_SHARD_IMAGES`` and the batch size, never on how many workers there are, and they
fall on multiples of the batch size, so every pipeline call holds the same images as when
one worker makes the whole job in one piece (a ``select`` job's fall between classes, whose
pools are sampled in batches of their own). Image seeds depend only on (seed, class,
number). So the parts concatenate to exactly the archive an unsharded run writes.

Fairness: a job never has more shards waiting or running than there are ready workers on its
queue (its *window*). A finishing shard enqueues the job's next one at the back of the queue,
behind whatever arrived meanwhile, so a small job submitted behind a 50,000-image job waits
for about one shard, not for the whole job, and several large jobs take turns shard by shard.

Shards live in one hash per job (``keys.shards``, fields ``<k>:<name>``), so a view of the
job reads all of them at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from core import keys, queueing, records, workers
from core.records import Piece, ShardRecord
from core.settings import Settings
from core.spec import DatasetSpec
from core.states import JobState

log = logging.getLogger("distill.jobs")

#: More shards than this and each one grows instead (bookkeeping stays small).
MAX_SHARDS = 1000


@dataclass(frozen=True)
class Shard:
    """Sampled images ``start..stop-1`` of the job's class-major plan, and their output count."""

    index: int
    start: int
    stop: int
    images: int


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

    Shards are balanced and each starts on a multiple of ``batch_size`` (with ``select``,
    on a class's first image).
    """
    if spec.budget_seconds is not None or spec.total_images <= shard_images:
        return []
    samples = spec.total_generated
    per_sample = spec.augment.n_copies + 1
    oversample = spec.select.oversample if spec.select is not None else 1
    # A select job samples oversample candidates per kept image: its shards hold fewer.
    target = max(shard_images // (per_sample * oversample), 1)
    count = min(math.ceil(samples / target), MAX_SHARDS)
    # A select job's shards hold whole classes (a class's pool is chosen from at once, in
    # batches of its own); any other's start on a multiple of the batch size.
    unit = spec.generated_per_class if spec.select is not None else batch_size
    size = math.ceil(math.ceil(samples / count) / unit) * unit
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


def describe(spec: DatasetSpec, shard: Shard | ShardRecord) -> tuple[int, int]:
    """The class indexes (first, last) a shard covers."""
    per_class = spec.generated_per_class
    return shard.start // per_class, (shard.stop - 1) // per_class


def create(redis: Redis, job_id: str, shards: list[Shard], *, queue: str) -> None:
    """Record a sharded job's shards, run from ``queue`` (call before enqueuing any)."""
    mapping: dict[FieldT, EncodableT] = {}
    for shard in shards:
        piece = Piece(job_id, shard.index)
        mapping.update(
            piece.fields(
                {
                    "index": shard.index,
                    "start": shard.start,
                    "stop": shard.stop,
                    "images": shard.images,
                    "state": JobState.queued.value,
                    "generated": 0,
                    "written": 0,
                    "attempts": 0,
                }
            )
        )
    with redis.pipeline() as pipe:
        pipe.hset(
            keys.job(job_id),
            mapping={"shards": len(shards), "shards_enqueued": 0, "queue": queue},
        )
        pipe.hset(keys.shards(job_id), mapping=mapping)
        pipe.sadd(keys.SHARDED, job_id)
        pipe.execute()


def top_up(redis: Redis, settings: Settings, job_id: str) -> int:
    """Enqueue the job's next shards until its window (ready workers) is full.

    Returns how many were enqueued. Safe to call from anywhere, any number of times.
    """
    window = max(
        workers.ready_count(redis, settings.queue_name, heartbeat_ttl=settings.heartbeat_ttl), 1
    )
    queue = Queue(settings.queue_name, connection=redis)
    key = keys.job(job_id)
    added = 0
    while True:
        total, enqueued, outcome, cancel, owner = redis.hmget(
            key, ["shards", "shards_enqueued", "outcome", "cancel_requested", "owner"]
        )
        if total is None or outcome is not None or cancel is not None:
            return added
        done = int(redis.scard(keys.shards_done(job_id)))
        if int(enqueued or 0) >= int(total) or int(enqueued or 0) - done >= window:
            return added
        index = int(redis.hincrby(key, "shards_enqueued", 1)) - 1
        if index >= int(total):
            return added
        entry = keys.shard_entry(job_id, index)
        queue.enqueue(
            keys.SHARD_TASK,
            job_id,
            index,
            job_id=entry,
            description=f"distill {job_id} shard {index}",
            **queueing.enqueue_options(settings),
        )
        # Behind whatever other callers queued meanwhile (core/queueing.py).
        who = owner.decode() if isinstance(owner, bytes) else str(owner or "")
        queueing.place(redis, queue.key, entry, who)
        added += 1


def mark_done(
    redis: Redis, job_id: str, index: int, *, fields: Mapping[str, str | int | float]
) -> None:
    """The shard's part is in the store."""
    piece = Piece(job_id, index)
    mapping = piece.fields(
        {"state": JobState.succeeded.value, "finished_at": repr(time.time()), **fields}
    )
    with redis.pipeline() as pipe:
        pipe.hset(piece.key, mapping=mapping)
        pipe.sadd(keys.shards_done(job_id), index)
        pipe.execute()
    log.info("shard succeeded", extra={"job_id": job_id, "shard": index, "state": "succeeded"})


def mark_stopped(
    redis: Redis, job_id: str, index: int, *, state: JobState, error: str | None = None
) -> None:
    """The shard ended without a part (canceled, or failed with ``error``)."""
    piece = Piece(job_id, index)
    fields: dict[str, EncodableT] = {"state": state.value, "finished_at": repr(time.time())}
    if error:
        fields["error"] = error[:2000]
    redis.hset(piece.key, mapping=piece.fields(fields))


def mark_assembly(
    redis: Redis,
    job_id: str,
    state: JobState,
    *,
    worker: str | None = None,
    partial: str | None = None,
) -> None:
    """The assembly's state; while it runs, its worker and partial file are the job's."""
    mapping: dict[str, EncodableT] = {"assembly": state.value}
    if worker is not None:
        mapping["worker"] = worker
    if partial is not None:
        mapping["partial"] = partial
    redis.hset(keys.job(job_id), mapping=mapping)  # type: ignore[arg-type]


def maybe_assemble(redis: Redis, settings: Settings, job_id: str) -> bool:
    """Enqueue the assembly once every shard is done; True if this call enqueued it.

    A transaction: the claim and the enqueue land together or not at all, so a worker that
    dies between a shard's end and this call leaves nothing half-done (``tend`` calls it again).
    """
    key = keys.job(job_id)
    done_key = keys.shards_done(job_id)
    queue = Queue(settings.queue_name, connection=redis)
    with redis.pipeline() as pipe:
        try:
            pipe.watch(key, done_key)  # type: ignore[no-untyped-call]
            total, claimed, outcome = pipe.hmget(key, ["shards", "assembly", "outcome"])
            if total is None or claimed is not None or outcome is not None:
                return False
            if int(pipe.scard(done_key)) < int(total):
                return False
            options = queueing.enqueue_options(settings)
            job = queue.create_job(
                keys.ASSEMBLE_TASK,
                args=(job_id,),
                job_id=keys.assembly_entry(job_id),
                description=f"assemble {job_id}",
                timeout=options.pop("job_timeout"),
                **options,
            )
            pipe.multi()
            pipe.hset(key, "assembly", JobState.queued.value)
            # At the front: every image is made, only the archive is missing.
            queue.enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()
        except WatchError:
            return False
    log.info("job assembling", extra={"job_id": job_id, "state": "running"})
    return True


def _cancel_rq(redis: Redis, rq_id: str) -> bool:
    """Cancel an RQ entry that has not started; False when it is running (or gone)."""
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
    running = 0
    for shard in records.read_shards(redis, job_id):
        if shard.state.is_terminal:
            continue
        if _cancel_rq(redis, keys.shard_entry(job_id, shard.index)):
            if shard.state is not JobState.running:
                mark_stopped(redis, job_id, shard.index, state=JobState.canceled)
            else:
                running += 1
        else:
            running += 1
    if not _cancel_rq(redis, keys.assembly_entry(job_id)):
        running += 1
    return running


def still_running(redis: Redis, job_id: str) -> bool:
    """True while any shard of the job (or its assembly) is running."""
    if redis.hget(keys.job(job_id), "assembly") == JobState.running.value.encode():
        return True
    return any(s.state is JobState.running for s in records.read_shards(redis, job_id))


def end_if_stopped(redis: Redis, job_id: str) -> bool:
    """Once no shard of a canceled job runs, record it canceled. True when the job has ended
    (canceled, or failed by a shard) and nothing runs: its parts can go."""
    if still_running(redis, job_id):
        return False
    record = records.read(redis, job_id)
    if record is None or record.outcome is not None:
        return True
    if not record.cancel_requested:
        return False
    records.finish(redis, job_id, outcome=JobState.canceled)  # once, whoever gets here first
    return True


def forget(redis: Redis, job_id: str) -> None:
    """The job ended: maintenance no longer needs to look at it."""
    redis.srem(keys.SHARDED, job_id)


def active(redis: Redis) -> list[str]:
    members: set[bytes] = redis.smembers(keys.SHARDED)  # type: ignore[assignment]
    return sorted(m.decode() for m in members)


def enqueue_cleanup(redis: Redis, queue_name: str, job_id: str) -> None:
    """Have a worker remove a failed or canceled job's parts from the store (the process
    that notices the end, the API say, may not reach the store)."""
    Queue(queue_name, connection=redis).enqueue(
        keys.CLEANUP_TASK,
        job_id,
        job_id=keys.cleanup_entry(job_id),
        at_front=True,
        result_ttl=600,
        failure_ttl=3600,
        description=f"remove the parts of {job_id}",
    )


def cancel(redis: Redis, settings: Settings, job_id: str) -> None:
    """Drop the queued shards of a job whose cancel flag is set; with none running, end it
    canceled here (else the last shard to stop does)."""
    if stop_all(redis, job_id) == 0 and records.finish(redis, job_id, outcome=JobState.canceled):
        enqueue_cleanup(redis, settings.queue_name, job_id)


def tend(redis: Redis, settings: Settings) -> None:
    """Look after every sharded job in flight on this queue (the maintenance loop calls it).

    Fills each job's window (workers may have joined), enqueues an assembly that a dead worker
    missed, and ends a canceled job whose shards have all stopped.
    """
    for job_id in active(redis):
        record = records.read(redis, job_id)
        if record is None or record.outcome is not None:
            forget(redis, job_id)
            continue
        if record.queue != settings.queue_name:
            continue  # another deployment's job (its own processes look after it)
        if record.ending:
            if end_if_stopped(redis, job_id):
                enqueue_cleanup(redis, settings.queue_name, job_id)
            continue
        top_up(redis, settings, job_id)
        maybe_assemble(redis, settings, job_id)
