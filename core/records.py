"""Our own job records in Redis, typed: request, progress, outcome, archive; shards of a job.

RQ runs jobs; these hashes say what the caller sees. They live beside RQ's keys because RQ
rewrites its job hash (meta included) whenever it saves a job, and because a job's public
outcome (canceled, archive digest) is ours, not RQ's. Key names: ``core.keys``.

A *piece* of work is either a whole job (run in one piece) or one shard of a sharded job;
both are started, re-queued and advanced by the same functions here, and read back as one
``Snapshot`` in one pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast, get_args, get_type_hints

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from core import keys, stats, webhooks
from core.states import JobState

log = logging.getLogger("distill.jobs")

#: How long an expired job is still remembered, to answer 410 instead of 404.
TOMBSTONE_S = 30 * 24 * 3600
DEFAULT_TTL = 7 * 24 * 3600


def _text(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


def _value(kind: Any, raw: str) -> Any:
    """``raw`` as ``kind`` (``int``, ``float``, ``str``, ``JobState``, or one of them | None)."""
    options = [k for k in get_args(kind) if k is not type(None)] or [kind]
    return options[0](raw)


_Record = TypeVar("_Record", bound="_Run")


_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _fields_of(cls: type) -> tuple[tuple[str, Any], ...]:
    """A record class's fields and their types, resolved once per class."""
    found = _FIELDS.get(cls)
    if found is None:
        hints = get_type_hints(cls)
        found = tuple((item.name, hints[item.name]) for item in dataclasses.fields(cls))
        _FIELDS[cls] = found
    return found


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What every piece of work records as it runs: progress, attempts, where it writes."""

    generated: int = 0
    written: int = 0
    attempts: int = 0
    worker: str | None = None
    partial: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_interruption: str | None = None

    @classmethod
    def _parse(cls: type[_Record], fields: Mapping[str, str], **given: Any) -> _Record:
        """Each field from the hash field of its name, converted by its annotation; a ``bool``
        field is a flag (set when present); absent or empty fields keep their defaults."""
        values = dict(given)
        for name, kind in _fields_of(cls):
            raw = fields.get(name)
            if name in values:
                continue
            if kind is bool:
                values[name] = raw is not None
            elif raw not in (None, ""):
                values[name] = _value(kind, raw)
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class ShardRecord(_Run):
    """One shard: sampled images ``start..stop-1`` of the job's class-major plan."""

    index: int
    start: int
    stop: int
    images: int
    state: JobState = JobState.queued
    error: str | None = None
    seconds_sampling: float = 0.0

    @classmethod
    def parse(cls, fields: Mapping[str, str]) -> ShardRecord:
        return cls._parse(fields)


@dataclass(frozen=True, kw_only=True)
class JobRecord(_Run):
    """A job's hash, parsed. ``request`` is the validated request's JSON, as submitted (empty
    in a stray hash that a late update wrote after the job was forgotten)."""

    id: str
    request: str = ""
    owner: str = ""
    created_at: float = 0.0
    ttl: int = DEFAULT_TTL
    total: int = 0
    expires_at: float | None = None
    outcome: JobState | None = None
    cancel_requested: bool = False
    error_type: str | None = None
    error_detail: str | None = None
    archive_url: str | None = None
    archive_key: str | None = None
    archive_size: int | None = None
    archive_sha256: str | None = None
    ipc_reached: int | None = None
    seconds_total: float | None = None
    seconds_sampling: float | None = None
    seconds_assembling: float | None = None
    callback_url: str | None = None
    webhook_queue: str | None = None
    webhook_retry_seconds: int | None = None
    #: Sharded jobs: how many shards, how many were enqueued so far, from which queue.
    shards: int | None = None
    shards_enqueued: int = 0
    queue: str | None = None
    #: Sharded jobs: the assembly's state once it was enqueued.
    assembly: JobState | None = None

    @classmethod
    def parse(cls, job_id: str, fields: Mapping[str, str]) -> JobRecord:
        return cls._parse(fields, id=job_id)

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    @property
    def ending(self) -> bool:
        """Canceled, or already ended (a sharded job another shard failed): stop working."""
        return self.cancel_requested or self.outcome is not None

    def expired(self, now: float | None = None) -> bool:
        """True once a finished job is past its retention."""
        return self.expires_at is not None and self.expires_at <= (now or time.time())

    def request_data(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.request)
        return data


@dataclass(frozen=True)
class Piece:
    """A unit of work a worker runs: a whole job (``index`` None) or one shard of it."""

    job_id: str
    index: int | None = None

    @property
    def key(self) -> str:
        """The hash its progress lives in."""
        return keys.job(self.job_id) if self.index is None else keys.shards(self.job_id)

    def field(self, name: str) -> str:
        return name if self.index is None else f"{self.index}:{name}"

    def fields(self, mapping: Mapping[str, EncodableT]) -> dict[FieldT, EncodableT]:
        return {self.field(k): v for k, v in mapping.items()}

    @property
    def rq_id(self) -> str:
        return self.job_id if self.index is None else keys.shard_entry(self.job_id, self.index)

    @property
    def label(self) -> str:
        return "job" if self.index is None else "shard"


@dataclass(frozen=True)
class Snapshot:
    """Everything a view of a job needs, read in one pipeline."""

    record: JobRecord
    shards: list[ShardRecord] = field(default_factory=list)
    #: RQ's status of the job's entry (a job in one piece only); None when the entry is gone.
    rq_status: str | None = None
    #: Index in the queue of the job's entry (its first shard's, if sharded), if waiting.
    queue_position: int | None = None
    webhook_attempts: list[dict[str, Any]] = field(default_factory=list)


def parse_shards(fields: Mapping[str, str]) -> list[ShardRecord]:
    """The shards in a job's shard hash (fields ``<k>:<name>``), in index order."""
    rows: dict[int, dict[str, str]] = {}
    for name, value in fields.items():
        index, _, attribute = name.partition(":")
        rows.setdefault(int(index), {})[attribute] = value
    return [ShardRecord.parse(rows[k]) for k in sorted(rows)]


def _queue_snapshot_reads(pipe: Any, job_id: str, queues: Sequence[str]) -> int:
    """Queue one job's reads; returns how many results they give."""
    pipe.hgetall(keys.job(job_id))
    pipe.hgetall(keys.shards(job_id))
    pipe.hget(keys.rq_job(job_id), "status")
    pipe.lrange(keys.webhook_attempts(job_id), 0, -1)
    for queue in queues:
        pipe.lpos(keys.rq_queue(queue), job_id)
        pipe.lpos(keys.rq_queue(queue), keys.shard_entry(job_id, 0))
    return 4 + 2 * len(queues)


def snapshots(
    redis: Redis, job_ids: Iterable[str], *, queue: str | Sequence[str]
) -> list[Snapshot | None]:
    """The snapshots of ``job_ids`` (None where a job is unknown), in one pipeline.

    ``queue``: the queue (or every model's queue) a waiting entry may be in.
    """
    ids = list(job_ids)
    queues = [queue] if isinstance(queue, str) else list(queue)
    with redis.pipeline(transaction=False) as pipe:
        width = 0
        for job_id in ids:
            width = _queue_snapshot_reads(pipe, job_id, queues)
        results = pipe.execute()
    return _parse_snapshots(ids, results, width)


def _parse_snapshots(ids: list[str], results: list[Any], width: int) -> list[Snapshot | None]:
    found: list[Snapshot | None] = []
    for n, job_id in enumerate(ids):
        raw, shard_raw, status, attempts, *positions = results[width * n : width * (n + 1)]
        if not raw:
            found.append(None)
            continue
        record = JobRecord.parse(job_id, _text(raw))
        wanted = positions[1::2] if record.sharded else positions[0::2]
        found.append(
            Snapshot(
                record=record,
                shards=parse_shards(_text(shard_raw)),
                rq_status=status.decode() if status is not None else None,
                queue_position=next((p for p in wanted if p is not None), None),
                webhook_attempts=[json.loads(a) for a in attempts],
            )
        )
    return found


def snapshot(redis: Redis, job_id: str, *, queue: str | Sequence[str]) -> Snapshot | None:
    """One job's snapshot (None when unknown or forgotten): one round trip."""
    return snapshots(redis, [job_id], queue=queue)[0]


async def snapshot_async(
    redis: AsyncRedis, job_id: str, *, queue: str | Sequence[str]
) -> Snapshot | None:
    """``snapshot`` on an asyncio client: the same reads in one round trip, awaited, so a
    polled status read runs on the API's event loop instead of a threadpool thread."""
    queues = [queue] if isinstance(queue, str) else list(queue)
    async with redis.pipeline(transaction=False) as pipe:
        width = _queue_snapshot_reads(pipe, job_id, queues)
        results = await pipe.execute()
    return _parse_snapshots([job_id], results, width)[0]


def read(redis: Redis, job_id: str) -> JobRecord | None:
    """The job's record; None when the job is unknown or forgotten."""
    raw: dict[bytes, bytes] = redis.hgetall(keys.job(job_id))  # type: ignore[assignment]
    return JobRecord.parse(job_id, _text(raw)) if raw else None


def read_shards(redis: Redis, job_id: str) -> list[ShardRecord]:
    """Every shard of a job, in index order (empty for a job in one piece)."""
    raw: dict[bytes, bytes] = redis.hgetall(keys.shards(job_id))  # type: ignore[assignment]
    return parse_shards(_text(raw))


def read_piece(redis: Redis, piece: Piece) -> JobRecord | ShardRecord | None:
    """The record a piece's own progress and attempts are in."""
    if piece.index is None:
        return read(redis, piece.job_id)
    return next((s for s in read_shards(redis, piece.job_id) if s.index == piece.index), None)


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
    index = keys.jobs_index(owner)
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
        pipe.hset(keys.job(job_id), mapping=mapping)
        pipe.zadd(index, {job_id: now})
        pipe.zremrangebyscore(index, 0, now - ttl - TOMBSTONE_S)
        stats.incr(pipe, "jobs_submitted")
        pipe.execute()
    log.info("job queued", extra={"job_id": job_id, "state": "queued", "images": total})
    return now


def forget(redis: Redis, job_id: str, owner: str) -> None:
    """Undo ``create`` (the job could not be enqueued)."""
    with redis.pipeline() as pipe:
        pipe.delete(keys.job(job_id), keys.shards(job_id))
        pipe.zrem(keys.jobs_index(owner), job_id)
        pipe.srem(keys.SHARDED, job_id)
        pipe.execute()


def mark_running(redis: Redis, piece: Piece, *, worker: str, partial: str) -> None:
    """The piece runs on ``worker``, writing ``partial`` (removed by whoever fails it)."""
    now = time.time()
    job_key = keys.job(piece.job_id)
    created = redis.hget(job_key, "created_at")
    with redis.pipeline() as pipe:
        fields: dict[str, EncodableT] = {
            "started_at": repr(now),
            "worker": worker,
            "partial": partial,
            "generated": 0,
            "written": 0,
        }
        if piece.index is not None:
            fields["state"] = JobState.running.value
            pipe.hdel(piece.key, piece.field("finished_at"))
            # The job started with its first shard.
            pipe.hsetnx(job_key, "started_at", repr(now))
        pipe.hset(piece.key, mapping=piece.fields(fields))
        pipe.hincrby(piece.key, piece.field("attempts"), 1)
        wait = max(now - float(created), 0.0) if created is not None else None
        if wait is not None and piece.index in (None, 0):
            stats.observe(pipe, "queue_wait", wait)
        pipe.execute()
    log.info(
        f"{piece.label} running",
        extra={
            "job_id": piece.job_id,
            "shard": piece.index,
            "state": "running",
            "worker": worker,
            "queue_wait_s": wait,
        },
    )


def mark_requeued(redis: Redis, piece: Piece, *, reason: str) -> None:
    """The piece goes back to the queue (its worker died or shut down); it starts over."""
    with redis.pipeline() as pipe:
        pipe.hdel(piece.key, piece.field("started_at"), piece.field("partial"))
        fields: dict[str, EncodableT] = {"generated": 0, "written": 0, "last_interruption": reason}
        if piece.index is not None:
            fields["state"] = JobState.queued.value
        pipe.hset(piece.key, mapping=piece.fields(fields))
        stats.incr(pipe, "jobs_requeued")
        pipe.execute()
    log.warning(
        f"{piece.label} requeued",
        extra={"job_id": piece.job_id, "shard": piece.index, "state": "queued", "reason": reason},
    )


def save_progress(
    redis: Redis, piece: Piece, *, generated: int, written: int, added: tuple[int, int]
) -> None:
    """The piece's totals so far; ``added`` = (generated, written) since the last call."""
    with redis.pipeline() as pipe:
        pipe.hset(
            piece.key,
            mapping=piece.fields(
                {"generated": generated, "written": written, "updated_at": repr(time.time())}
            ),
        )
        stats.incr(pipe, "images_generated", added[0])
        stats.incr(pipe, "images_written", added[1])
        pipe.execute()


def request_cancel(redis: Redis, job_id: str) -> None:
    redis.hset(keys.job(job_id), "cancel_requested", "1")


def ending(redis: Redis, job_id: str) -> bool:
    """Canceled or ended (one cheap read, between batches)."""
    cancel, outcome = redis.hmget(keys.job(job_id), ["cancel_requested", "outcome"])
    return cancel is not None or outcome is not None


def finish(
    redis: Redis,
    job_id: str,
    *,
    outcome: JobState,
    fields: Mapping[str, str | int | float] | None = None,
) -> bool:
    """Record a terminal outcome once; False when one was already recorded.

    The job (and its archive) expire ``ttl`` seconds later (``expires_at``); the record, and a
    sharded job's shard keys, stay as a tombstone for ``TOMBSTONE_S`` more, so callers get 410
    rather than 404. A job with a ``callback_url`` gets its event queued for the webhook sender.
    """
    key = keys.job(job_id)

    def record_outcome(pipe: Pipeline) -> tuple[JobRecord, float | None] | None:
        """Under WATCH of the job's hash: read it, then queue the writes (``transaction``
        runs this again whenever the hash changed meanwhile: progress, a cancel flag)."""
        raw = _text(pipe.hgetall(key))  # type: ignore[arg-type]
        if not raw or "outcome" in raw:
            return None  # nothing queued: the transaction's EXEC writes nothing
        record = JobRecord.parse(job_id, raw)
        now = time.time()
        seconds = max(now - record.started_at, 1e-6) if record.started_at else None
        mapping: dict[FieldT, EncodableT] = {
            "outcome": outcome.value,
            "finished_at": repr(now),
            "expires_at": repr(now + record.ttl),
        }
        mapping.update(fields or {})
        pipe.multi()
        pipe.hset(key, mapping=mapping)
        keep = record.ttl + TOMBSTONE_S
        pipe.expire(key, keep)
        if record.sharded:
            pipe.expire(keys.shards(job_id), keep)
            pipe.expire(keys.shards_done(job_id), keep)
            pipe.srem(keys.SHARDED, job_id)
        stats.incr(pipe, f"jobs_{outcome.value}")
        if seconds is not None:
            stats.observe(pipe, "job_duration", seconds)
            written = int((fields or {}).get("written", record.written))
            if outcome is JobState.succeeded:
                stats.last_job(pipe, images=written, seconds=seconds, finished_at=now)
        return record, seconds

    # One transaction: readers never see the outcome without its fields (an archive, say).
    # redis-py annotates ``func`` as returning None, though value_from_callable hands back
    # what it returns.
    recorded = cast(
        "tuple[JobRecord, float | None] | None",
        redis.transaction(record_outcome, key, value_from_callable=True),  # type: ignore[arg-type]
    )
    if recorded is None:
        return False
    record, seconds = recorded
    details = {k: v for k, v in (fields or {}).items() if k.startswith(("error_", "archive_"))}
    log.log(
        logging.WARNING if outcome is JobState.failed else logging.INFO,
        f"job {outcome.value}",
        extra={"job_id": job_id, "state": outcome.value, "seconds": seconds, **details},
    )
    if record.callback_url and record.webhook_queue:
        webhooks.enqueue(
            redis,
            job_id,
            queue=record.webhook_queue,
            retry_seconds=record.webhook_retry_seconds or 3600,
            ttl=record.ttl,
        )
    return True
