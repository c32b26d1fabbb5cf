"""Jobs as the API sees them: enqueue, fetch, cancel, list; RQ states mapped to ``JobState``.

The API talks to Redis only. It enqueues the worker's task by its dotted name, so this process
never imports torch or diffusers.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from rq import Callback, Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty

from service.config import Settings
from service.errors import ArchiveGone, JobConflict, JobNotFound, QueueFull
from service.schemas import Archive, JobError, JobPublic, JobState, Progress, Timings
from worker import records
from worker.spec import DatasetSpec

TASK = "worker.tasks.distill"
ON_FAILURE = "worker.callbacks.on_failure"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

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


@dataclass(frozen=True)
class ArchiveFile:
    path: Path
    size_bytes: int
    sha256: str


def _queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis)


def _time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC) if value else None


def submit(
    redis: Redis, settings: Settings, spec: DatasetSpec, *, archive_url_for: Callable[[str], str]
) -> JobPublic:
    """Accept a job: record it, then enqueue it for the next free worker."""
    queue = _queue(redis, settings)
    if queue.count >= settings.max_queued_jobs:
        raise QueueFull(
            f"{queue.count} jobs are waiting (limit {settings.max_queued_jobs}); retry later",
            retry_after=30,
        )
    job_id = uuid.uuid4().hex
    payload = spec.model_dump(mode="json")
    records.create(redis, job_id, request=payload, total=spec.total_images, ttl=settings.result_ttl)
    try:
        queue.enqueue(
            TASK,
            payload,
            job_id=job_id,
            job_timeout=settings.job_timeout,
            result_ttl=settings.result_ttl,
            failure_ttl=settings.result_ttl,
            on_failure=Callback(ON_FAILURE),
            # Only a lost worker is retried: the task clears retries on its own errors.
            retry=Retry(max=settings.max_attempts - 1) if settings.max_attempts > 1 else None,
            description=f"distill {spec.preset or len(spec.classes())} classes",
        )
    except Exception:
        redis.delete(records.job_key(job_id))
        redis.zrem(records.JOBS_INDEX, job_id)
        raise
    return fetch(redis, settings, job_id, archive_url=archive_url_for(job_id))


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


def fetch(redis: Redis, settings: Settings, job_id: str, *, archive_url: str) -> JobPublic:
    """The public view of one job; ``JobNotFound`` when unknown or expired."""
    if not _JOB_ID.match(job_id):
        raise JobNotFound(f"no job with id {job_id!r}")
    record = records.read(redis, job_id)
    if not record:
        raise JobNotFound(f"no job with id {job_id!r}")
    rq_job = None
    if "outcome" not in record:
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
    if "outcome" in record:
        state = _OUTCOMES[record["outcome"]]
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
        position = _queue(redis, settings).get_job_position(job_id)

    return JobPublic(
        id=job_id,
        state=state,
        created_at=_time(record["created_at"]) or dt.datetime.now(dt.UTC),
        started_at=_time(record.get("started_at")),
        finished_at=_time(record.get("finished_at")),
        request=request,
        progress=Progress(
            generated=int(record.get("generated", 0)),
            written=written,
            total=total,
            images_per_second=round(rate, 3) if rate else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            ipc_reached=int(record["ipc_reached"]) if "ipc_reached" in record else None,
        ),
        queue_position=position,
        cancel_requested="cancel_requested" in record,
        worker=record.get("worker"),
        attempts=int(record.get("attempts", 0)),
        last_interruption=record.get("last_interruption"),
        error=error,
        archive=archive,
        timings=(
            Timings(
                seconds_total=float(record["seconds_total"]),
                seconds_sampling=float(record["seconds_sampling"]),
            )
            if "seconds_total" in record
            else None
        ),
    )


def cancel(redis: Redis, settings: Settings, job_id: str, *, archive_url: str) -> JobPublic:
    """Cancel a job: at once when queued, between batches when running."""
    current = fetch(redis, settings, job_id, archive_url=archive_url)
    if current.state in (JobState.succeeded, JobState.failed):
        raise JobConflict(f"job {job_id} already {current.state.value}; nothing to cancel")
    if current.state is JobState.canceled:
        return current
    # The flag first: a worker that dequeues the job right now sees it before sampling.
    records.request_cancel(redis, job_id)
    rq_job = _rq_job(redis, job_id)
    if rq_job is not None and rq_job.get_status() != JobStatus.STARTED:
        try:
            rq_job.cancel()
        except InvalidJobOperation:
            pass  # it started or ended meanwhile; the flag stops it between batches
        else:
            records.finish(redis, job_id, outcome=records.CANCELED)
    return fetch(redis, settings, job_id, archive_url=archive_url)


def recent_ids(redis: Redis, *, limit: int) -> list[str]:
    """Ids of the most recent jobs, newest first."""
    ids: list[bytes] = redis.zrevrange(records.JOBS_INDEX, 0, limit - 1)  # type: ignore[assignment]
    return [i.decode() for i in ids]


def archive_file(redis: Redis, settings: Settings, job_id: str) -> ArchiveFile:
    """The finished archive on disk; 409 until the job succeeded, 410 if it was removed."""
    job = fetch(redis, settings, job_id, archive_url="")
    if job.state is not JobState.succeeded or job.archive is None:
        raise JobConflict(
            f"job {job_id} is {job.state.value}; the archive exists once it succeeded"
        )
    path = records.archive_path(settings.data_dir, job_id)
    if not path.is_file():
        raise ArchiveGone(f"the archive of job {job_id} is no longer on disk")
    return ArchiveFile(path=path, size_bytes=job.archive.size_bytes, sha256=job.archive.sha256)
