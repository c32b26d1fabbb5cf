"""Jobs as the API reads and steers them: fetch, wait, cancel, list, the archive and preview
files; RQ states are mapped to ``JobState`` by ``service.views``.

The API talks to Redis only; it never imports torch or diffusers.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from core import (
    keys,
    models,
    records,
    shards,
)
from core.records import Snapshot
from core.settings import Settings
from core.states import JobState
from service.auth import PUBLIC
from service.downloads import StoredFile
from service.errors import (
    ArchiveGone,
    InvalidCursor,
    JobConflict,
    JobExpired,
    JobNotFound,
)
from service.schemas import (
    JobPublic,
)
from service.views import view

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: Most index entries one page request reads while filtering by state.
MAX_SCAN = 2000


def queue_for(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis)


def visible_record(redis: Redis, settings: Settings, job_id: str, owner: str) -> Snapshot:
    """The job's snapshot; 404 when unknown or another owner's, 410 when expired."""
    found = (
        records.snapshot(redis, job_id, queue=models.queues(settings))
        if JOB_ID.match(job_id)
        else None
    )
    return _visible(found, job_id, owner)


async def fetch_async(
    redis: AsyncRedis, settings: Settings, job_id: str, *, owner: str, archive_url: str
) -> JobPublic:
    """``fetch`` on the asyncio client: the polled status read, on the event loop."""
    found = (
        await records.snapshot_async(redis, job_id, queue=models.queues(settings))
        if JOB_ID.match(job_id)
        else None
    )
    return view(_visible(found, job_id, owner), archive_url=archive_url)


def _visible(found: Snapshot | None, job_id: str, owner: str) -> Snapshot:
    # Another key's job is indistinguishable from a missing one.
    if found is None or not found.record.request or (found.record.owner or PUBLIC) != owner:
        raise JobNotFound(f"no job with id {job_id!r}")
    if found.record.expired():
        raise JobExpired(
            f"job {job_id} ended more than its retention ({found.record.ttl} s) ago; "
            "its archive has been removed"
        )
    return found


def settings_for_job(settings: Settings, alias: str | None) -> Settings:
    """``settings`` scoped to the model alias a recorded job runs on (its queue, workers)."""
    try:
        entry = models.lookup(settings, alias)
    except KeyError:
        entry = models.default(settings)  # a model since removed from the deployment
    return models.scoped(settings, entry)


def fetch(
    redis: Redis, settings: Settings, job_id: str, *, owner: str, archive_url: str
) -> JobPublic:
    """The public view of one job (404 unknown, 410 expired): one Redis round trip."""
    return view(visible_record(redis, settings, job_id, owner), archive_url=archive_url)


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
    key = keys.job(job.id)
    checks = 0
    while not job.state.is_terminal and time.monotonic() < deadline:
        time.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
        checks += 1
        # Every second, the full view too (a job whose queue entry vanished is failed).
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
        shards.cancel(redis, settings_for_job(settings, current.request.model), job_id)
        return fetch(redis, settings, job_id, owner=owner, archive_url=archive_url)
    try:
        rq_job: Job | None = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        rq_job = None
    if rq_job is not None and rq_job.get_status() != JobStatus.STARTED:
        try:
            rq_job.cancel()
        except InvalidJobOperation:
            pass  # it started or ended meanwhile; the flag stops it between batches
        else:
            records.finish(redis, job_id, outcome=JobState.canceled)
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

    Returns the jobs and the cursor of the next page (None at the end). Without a state
    filter a page is one index read and one pipeline.
    """
    index = keys.jobs_index(owner)
    high: float | str = "+inf"
    after_id = None
    if cursor:
        high, after_id = _decode_cursor(cursor)
    found: list[JobPublic] = []
    scanned = 0
    while len(found) < limit and scanned < MAX_SCAN:
        want = limit - len(found)
        rows: list[tuple[bytes, float]] = redis.zrevrangebyscore(  # type: ignore[assignment]
            index,
            high,
            "-inf",
            start=0,
            num=want + 1 if state is None else want + 50,
            withscores=True,
        )
        fresh = [
            (member.decode(), score)
            for member, score in rows
            # Same-score members come in reverse id order: skip those already returned.
            if not (after_id is not None and score == high and member.decode() >= after_id)
        ]
        if not fresh:
            return found, None
        batch = fresh[:want] if state is None else fresh
        snaps = records.snapshots(redis, [i for i, _ in batch], queue=models.queues(settings))
        for (job_id, score), snap in zip(batch, snaps, strict=True):
            scanned += 1
            high, after_id = score, job_id
            try:
                job = view(_visible(snap, job_id, owner), archive_url=archive_url_for(job_id))
            except (JobNotFound, JobExpired):
                continue
            if state is None or job.state is state:
                found.append(job)
                if len(found) == limit:
                    break
        if state is None and len(rows) <= want:
            return found, None  # the index has nothing older
    return found, _encode_cursor(float(high), str(after_id))


def preview_file(redis: Redis, settings: Settings, job_id: str, *, owner: str) -> StoredFile:
    """The job's contact sheet in storage; 404 until it exists (the job succeeded)."""
    visible_record(redis, settings, job_id, owner)
    found = StoredFile.find(settings, keys.preview(job_id))
    if found is None:
        raise JobNotFound(f"job {job_id} has no preview (yet): it appears when the job succeeds")
    return found


def archive_file(redis: Redis, settings: Settings, job_id: str, *, owner: str) -> StoredFile:
    """The finished archive in storage; 409 until the job succeeded, 410 if it was removed."""
    job = fetch(redis, settings, job_id, owner=owner, archive_url="")
    if job.state is not JobState.succeeded or job.archive is None:
        raise JobConflict(
            f"job {job_id} is {job.state.value}; the archive exists once it succeeded"
        )
    found = StoredFile.find(settings, keys.archive(job_id), sha256=job.archive.sha256)
    if found is None:
        raise ArchiveGone(f"the archive of job {job_id} is no longer in storage")
    return found
