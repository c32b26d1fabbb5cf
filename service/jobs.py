"""Jobs as the API sees them: enqueue, fetch, cancel, list; RQ states mapped to ``JobState``.

The API talks to Redis only. It enqueues the worker's task by its dotted name, so this process
never imports torch or diffusers.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable

from redis import Redis
from rq import Callback, Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty

from core import evaluations, queueing, records, shards, webhooks
from core.evaluations import EvaluationRequest
from core.settings import Settings
from core.spec import DatasetSpec
from service.auth import PUBLIC
from service.downloads import StoredFile
from service.errors import (
    ArchiveGone,
    BadIdempotencyKey,
    InvalidCursor,
    InvalidField,
    JobConflict,
    JobExpired,
    JobNotFound,
    QueueFull,
    TooManyImages,
)
from service.schemas import (
    Archive,
    Evaluation,
    EvaluationProgress,
    JobError,
    JobPublic,
    JobState,
    Progress,
    Shard,
    Timings,
    WebhookStatus,
)

TASK = "worker.tasks.distill"
ON_FAILURE = "core.failures.on_failure"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: Most index entries one page request reads while filtering by state.
MAX_SCAN = 2000

_RQ_STATES = {
    JobStatus.QUEUED: JobState.queued,
    JobStatus.DEFERRED: JobState.queued,
    JobStatus.SCHEDULED: JobState.queued,
    JobStatus.STARTED: JobState.running,
    # Our record says "succeeded" once the archive is published; RQ "finished" without that
    # is a job that stopped for a worker shutdown and is being put back in the queue.
    JobStatus.FINISHED: JobState.queued,
    JobStatus.FAILED: JobState.failed,
    JobStatus.STOPPED: JobState.failed,
    JobStatus.CANCELED: JobState.canceled,
}
_OUTCOMES = {
    records.SUCCEEDED: JobState.succeeded,
    records.FAILED: JobState.failed,
    records.CANCELED: JobState.canceled,
}


def _queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis)


def _time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC) if value else None


IDEMPOTENCY_KEY = "distill:idem:{}:{}"


def submit(
    redis: Redis,
    settings: Settings,
    spec: DatasetSpec,
    *,
    owner: str,
    idempotency_key: str | None,
    archive_url_for: Callable[[str], str],
) -> tuple[JobPublic, bool]:
    """Accept a job: record it, then enqueue it for the next free worker.

    Returns the job and whether it was created now (False: an ``Idempotency-Key`` replay).
    """
    if spec.callback_url:
        if settings.webhook_secret is None:
            raise InvalidField(
                "callback_url: this service has no DISTILL_WEBHOOK_SECRET, so it sends no webhooks"
            )
        try:
            webhooks.check_destination(
                spec.callback_url, allow_private=settings.webhook_allow_private
            )
        except webhooks.WebhookRefused as exc:
            raise InvalidField(f"callback_url: {exc}") from None
    if spec.total_images > settings.max_job_images:
        raise TooManyImages(
            f"ipc: classes x ipc = {spec.total_images} images exceeds this service's limit of "
            f"{settings.max_job_images} (DISTILL_MAX_JOB_IMAGES)"
        )
    payload = spec.model_dump(mode="json")
    job_id = uuid.uuid4().hex
    idem_key = None
    if idempotency_key is not None:
        body_hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        key_hash = hashlib.sha256(idempotency_key.encode()).hexdigest()
        idem_key = IDEMPOTENCY_KEY.format(owner, key_hash)
        claim = f"{job_id} {body_hash}"
        if not redis.set(idem_key, claim, nx=True, ex=settings.result_ttl + records.TOMBSTONE_S):
            stored: bytes = redis.get(idem_key) or b""  # type: ignore[assignment]
            existing = stored.decode()
            first_id, _, first_hash = existing.partition(" ")
            if first_hash != body_hash:
                raise BadIdempotencyKey(
                    "Idempotency-Key was already used with a different request body"
                )
            return fetch(
                redis, settings, first_id, owner=owner, archive_url=archive_url_for(first_id)
            ), False
    queue = _queue(redis, settings)
    if queue.count >= settings.max_queued_jobs:
        if idem_key:
            redis.delete(idem_key)
        raise QueueFull(
            f"{queue.count} jobs are waiting (limit {settings.max_queued_jobs}); retry later",
            retry_after=30,
        )
    extra: dict[str, str | int] = {"archive_url": archive_url_for(job_id)}
    if spec.callback_url:
        extra.update(webhooks.record_fields(settings, spec.callback_url))
    records.create(
        redis,
        job_id,
        request=payload,
        total=spec.total_images,
        ttl=settings.result_ttl,
        owner=owner,
        extra=extra,
    )
    pieces = shards.plan(spec, shard_images=settings.shard_images, batch_size=settings.batch_size)
    try:
        if pieces:
            shards.create(redis, job_id, pieces, queue=settings.queue_name)
            shards.top_up(redis, settings, job_id)
            return fetch(
                redis, settings, job_id, owner=owner, archive_url=archive_url_for(job_id)
            ), True
        queue.enqueue(
            TASK,
            payload,
            job_id=job_id,
            description=f"distill {spec.preset or len(spec.classes())} classes",
            **queueing.enqueue_options(settings, on_failure=ON_FAILURE),
        )
        queueing.place(redis, queue.key, job_id, owner)
    except Exception:
        redis.delete(records.job_key(job_id))
        redis.zrem(records.jobs_index(owner), job_id)
        if idem_key:
            redis.delete(idem_key)
        raise
    return fetch(redis, settings, job_id, owner=owner, archive_url=archive_url_for(job_id)), True


def _reap_abandoned(redis: Redis, settings: Settings) -> None:
    """Fail (via the failure callback) jobs whose worker stopped heartbeating."""
    StartedJobRegistry(
        name=settings.queue_name, connection=redis, death_penalty_class=TimerDeathPenalty
    ).cleanup()


def _rq_job(redis: Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return None


def _record(redis: Redis, job_id: str, owner: str) -> dict[str, str]:
    """The job's record; 404 when unknown or another owner's, 410 when expired."""
    record = records.read(redis, job_id) if _JOB_ID.match(job_id) else {}
    # Another key's job is indistinguishable from a missing one.
    if not record or record.get("owner", PUBLIC) != owner:
        raise JobNotFound(f"no job with id {job_id!r}")
    if records.expired(record):
        raise JobExpired(
            f"job {job_id} ended more than its retention ({record.get('ttl')} s) ago; "
            "its archive has been removed"
        )
    return record


def fetch(
    redis: Redis, settings: Settings, job_id: str, *, owner: str, archive_url: str
) -> JobPublic:
    """The public view of one job (404 unknown, 410 expired)."""
    record = _record(redis, job_id, owner)
    rq_job = None
    if "outcome" not in record and "shards" in record:
        if "started_at" in record:
            _reap_abandoned(redis, settings)
            record = records.read(redis, job_id)
    elif "outcome" not in record:
        rq_job = _rq_job(redis, job_id)
        if rq_job is not None and rq_job.get_status() == JobStatus.STARTED:
            _reap_abandoned(redis, settings)
            record = records.read(redis, job_id)
            rq_job = _rq_job(redis, job_id)
    return _view(redis, settings, job_id, record, rq_job, archive_url=archive_url)


def _view(
    redis: Redis,
    settings: Settings,
    job_id: str,
    record: dict[str, str],
    rq_job: Job | None,
    *,
    archive_url: str,
) -> JobPublic:
    error: JobError | None = None
    shard_rows = (
        shards.read_all(redis, job_id, int(record["shards"])) if "shards" in record else None
    )
    if "outcome" in record:
        state = _OUTCOMES[record["outcome"]]
    elif shard_rows is not None:
        state = JobState.running if "started_at" in record else JobState.queued
    elif rq_job is None:
        state = JobState.failed
        error = JobError(type="lost", detail="the job's queue entry expired or was removed")
    else:
        status = rq_job.get_status(refresh=False)
        state = _RQ_STATES.get(status, JobState.queued) if status else JobState.queued
        if state is JobState.failed:
            result = rq_job.latest_result()
            text = (result.exc_string or "").strip().splitlines() if result else []
            error = JobError(type="internal", detail=text[-1] if text else "the job failed")
    if record.get("error_type"):
        error = JobError(type=record["error_type"], detail=record.get("error_detail", ""))

    request = DatasetSpec.model_validate(json.loads(record["request"]))
    written = int(record.get("written", 0))
    generated = int(record.get("generated", 0))
    if shard_rows is not None and "outcome" not in record:
        written = sum(int(row.get("written", 0)) for row in shard_rows)
        generated = sum(int(row.get("generated", 0)) for row in shard_rows)
    total: int | None = int(record.get("total", 0)) or None
    if total is None and state is JobState.succeeded:
        total = written  # a time-budget job: its size is known once it ends
    started = record.get("started_at")
    rate = eta = None
    if started and state is JobState.running:
        elapsed = max(time.time() - float(started), 1e-6)
        rate = written / elapsed if written else None
        if request.budget_seconds is not None:
            eta = max(request.budget_seconds - elapsed, 0.0)
        elif rate and total is not None:
            eta = (total - written) / rate
    elif started and record.get("finished_at"):
        elapsed = max(float(record["finished_at"]) - float(started), 1e-6)
        rate = written / elapsed if written else None

    archive = None
    if state is JobState.succeeded and record.get("archive_sha256"):
        archive = Archive(
            url=archive_url,
            size_bytes=int(record["archive_size"]),
            sha256=record["archive_sha256"],
        )
    position = None
    if state is JobState.queued:
        first = shards.shard_job_id(job_id, 0) if shard_rows is not None else job_id
        position = _queue(redis, settings).get_job_position(first)

    return JobPublic(
        id=job_id,
        state=state,
        created_at=_time(record["created_at"]) or dt.datetime.now(dt.UTC),
        started_at=_time(record.get("started_at")),
        finished_at=_time(record.get("finished_at")),
        request=request,
        progress=Progress(
            generated=generated,
            written=written,
            total=total,
            images_per_second=round(rate, 3) if rate else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            ipc_reached=int(record["ipc_reached"]) if "ipc_reached" in record else None,
        ),
        queue_position=position,
        cancel_requested="cancel_requested" in record,
        worker=record.get("worker"),
        attempts=(
            max((int(row.get("attempts", 0)) for row in shard_rows), default=0)
            if shard_rows is not None
            else int(record.get("attempts", 0))
        ),
        shards=(
            [_shard_view(request, row) for row in shard_rows] if shard_rows is not None else None
        ),
        last_interruption=record.get("last_interruption"),
        webhook=(
            WebhookStatus.model_validate(
                {"url": record["callback_url"], "attempts": webhooks.attempts(redis, job_id)}
            )
            if record.get("callback_url")
            else None
        ),
        error=error,
        archive=archive,
        timings=(
            Timings(
                seconds_total=float(record["seconds_total"]),
                seconds_sampling=float(record["seconds_sampling"]),
                seconds_assembling=(
                    float(record["seconds_assembling"]) if "seconds_assembling" in record else None
                ),
            )
            if "seconds_total" in record
            else None
        ),
    )


def _shard_view(request: DatasetSpec, row: dict[str, str]) -> Shard:
    first, last = shards.describe(request, row)
    return Shard(
        index=int(row["index"]),
        state=row.get("state", shards.QUEUED),
        first_class=first,
        last_class=last,
        images=int(row["images"]),
        generated=int(row.get("generated", 0)),
        written=int(row.get("written", 0)),
        worker=row.get("worker"),
        attempts=int(row.get("attempts", 0)),
        started_at=_time(row.get("started_at")),
        finished_at=_time(row.get("finished_at")),
        last_interruption=row.get("last_interruption"),
        error=row.get("error"),
    )


def wait_until_terminal(
    redis: Redis,
    settings: Settings,
    job: JobPublic,
    *,
    owner: str,
    seconds: float,
    archive_url: str,
) -> JobPublic:
    """Wait until the job ends or ``seconds`` pass; returns its latest view.

    Checks one hash field every 20 ms (a cheap Redis call), builds the full view once at the end.
    """
    deadline = time.monotonic() + seconds
    key = records.job_key(job.id)
    checks = 0
    while not job.state.is_terminal and time.monotonic() < deadline:
        time.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
        checks += 1
        # Every second, the full view too: it also notices a lost worker.
        if redis.hexists(key, "outcome") or checks % 50 == 0:
            job = fetch(redis, settings, job.id, owner=owner, archive_url=archive_url)
    return job


def cancel(
    redis: Redis, settings: Settings, job_id: str, *, owner: str, archive_url: str
) -> JobPublic:
    """Cancel a job: at once when queued, between batches when running."""
    current = fetch(redis, settings, job_id, owner=owner, archive_url=archive_url)
    if current.state in (JobState.succeeded, JobState.failed):
        raise JobConflict(f"job {job_id} already {current.state.value}; nothing to cancel")
    if current.state is JobState.canceled:
        return current
    # The flag first: a worker that dequeues the job right now sees it before sampling.
    records.request_cancel(redis, job_id)
    if current.shards is not None:
        # Queued shards are dropped now; running ones stop between batches, and the last
        # to stop records the cancel. With none running, it is canceled here.
        if shards.stop_all(redis, job_id) == 0 and records.finish(
            redis, job_id, outcome=records.CANCELED
        ):
            shards.enqueue_cleanup(redis, settings.queue_name, job_id)
        return fetch(redis, settings, job_id, owner=owner, archive_url=archive_url)
    rq_job = _rq_job(redis, job_id)
    if rq_job is not None and rq_job.get_status() != JobStatus.STARTED:
        try:
            rq_job.cancel()
        except InvalidJobOperation:
            pass  # it started or ended meanwhile; the flag stops it between batches
        else:
            records.finish(redis, job_id, outcome=records.CANCELED)
    return fetch(redis, settings, job_id, owner=owner, archive_url=archive_url)


def _encode_cursor(score: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}:{job_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, _, job_id = raw.partition(":")
        return float(score), job_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidCursor("cursor is not one this API returned") from None


def list_page(
    redis: Redis,
    settings: Settings,
    *,
    owner: str,
    state: JobState | None,
    limit: int,
    cursor: str | None,
    archive_url_for: Callable[[str], str],
) -> tuple[list[JobPublic], str | None]:
    """One page of the owner's jobs, newest first, optionally in one state.

    Returns the jobs and the cursor of the next page (None at the end).
    """
    index = records.jobs_index(owner)
    high: float | str = "+inf"
    after_id = None
    if cursor:
        high, after_id = _decode_cursor(cursor)
    found: list[JobPublic] = []
    scanned = 0
    while len(found) < limit and scanned < MAX_SCAN:
        rows: list[tuple[bytes, float]] = redis.zrevrangebyscore(  # type: ignore[assignment]
            index, high, "-inf", start=0, num=limit + 50, withscores=True
        )
        fresh = [
            (member.decode(), score)
            for member, score in rows
            # Same-score members come in reverse id order: skip those already returned.
            if not (after_id is not None and score == high and member.decode() >= after_id)
        ]
        if not fresh:
            return found, None
        for job_id, score in fresh:
            scanned += 1
            high, after_id = score, job_id
            try:
                job = fetch(
                    redis, settings, job_id, owner=owner, archive_url=archive_url_for(job_id)
                )
            except (JobNotFound, JobExpired):
                continue
            if state is None or job.state is state:
                found.append(job)
                if len(found) == limit:
                    break
    return found, _encode_cursor(float(high), str(after_id))


def preview_file(redis: Redis, settings: Settings, job_id: str, *, owner: str) -> StoredFile:
    """The job's contact sheet in storage; 404 until it exists (the job succeeded)."""
    _record(redis, job_id, owner)
    found = StoredFile.find(settings, f"{job_id}.preview.png")
    if found is None:
        raise JobNotFound(f"job {job_id} has no preview (yet): it appears when the job succeeds")
    return found


def _evaluation_view(eval_id: str, record: dict[str, str]) -> Evaluation:
    def number(name: str) -> int | None:
        return int(record[name]) if name in record else None

    return Evaluation(
        id=eval_id,
        job_id=record["job_id"],
        state=record.get("state", "queued"),
        testset=record["testset"],
        request=json.loads(record["request"]),
        progress=EvaluationProgress(
            run=number("run"), runs=number("runs"), epoch=number("epoch"), epochs=number("epochs")
        ),
        result=json.loads(record["result"]) if "result" in record else None,
        error=record.get("error"),
        created_at=_time(record["created_at"]) or dt.datetime.now(dt.UTC),
        finished_at=_time(record.get("finished_at")),
    )


def submit_evaluation(
    redis: Redis, settings: Settings, job_id: str, request: EvaluationRequest, *, owner: str
) -> Evaluation:
    """Queue an evaluation of a succeeded job's archive on a named test set."""
    job = fetch(redis, settings, job_id, owner=owner, archive_url="")
    if job.state is not JobState.succeeded:
        raise JobConflict(
            f"job {job_id} is {job.state.value}; only a finished dataset is evaluated"
        )
    if settings.testsets_dir is not None and not evaluations.testset_path(
        settings.testsets_dir, request.testset
    ):
        known = ", ".join(evaluations.available_testsets(settings.testsets_dir)) or "none"
        raise InvalidField(f"testset: no test set {request.testset!r} (available: {known})")
    eval_id = uuid.uuid4().hex
    evaluations.create(redis, eval_id, job_id=job_id, request=request, ttl=settings.result_ttl)
    _queue(redis, settings).enqueue(
        evaluations.TASK,
        eval_id,
        job_id=eval_id,
        job_timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.result_ttl,
        on_failure=Callback(evaluations.ON_FAILURE),
        description=f"evaluate {job_id} on {request.testset}",
    )
    return get_evaluation(redis, settings, job_id, eval_id, owner=owner)


def get_evaluation(
    redis: Redis, settings: Settings, job_id: str, eval_id: str, *, owner: str
) -> Evaluation:
    _record(redis, job_id, owner)
    record = evaluations.read(redis, eval_id) if _JOB_ID.match(eval_id) else {}
    if not record or record.get("job_id") != job_id:
        raise JobNotFound(f"job {job_id} has no evaluation {eval_id!r}")
    return _evaluation_view(eval_id, record)


def list_evaluations(
    redis: Redis, settings: Settings, job_id: str, *, owner: str
) -> list[Evaluation]:
    _record(redis, job_id, owner)
    views = []
    for eval_id in evaluations.for_job(redis, job_id):
        record = evaluations.read(redis, eval_id)
        if record:
            views.append(_evaluation_view(eval_id, record))
    return views


def archive_file(redis: Redis, settings: Settings, job_id: str, *, owner: str) -> StoredFile:
    """The finished archive in storage; 409 until the job succeeded, 410 if it was removed."""
    job = fetch(redis, settings, job_id, owner=owner, archive_url="")
    if job.state is not JobState.succeeded or job.archive is None:
        raise JobConflict(
            f"job {job_id} is {job.state.value}; the archive exists once it succeeded"
        )
    found = StoredFile.find(settings, f"{job_id}.zip", sha256=job.archive.sha256)
    if found is None:
        raise ArchiveGone(f"the archive of job {job_id} is no longer in storage")
    return found
