"""A job as the API shows it: ``view(snapshot)`` -> ``JobPublic``, a function of one snapshot
(state, progress, shards, timings, archive, webhook); no Redis here.
"""

from __future__ import annotations

import datetime as dt
import time

from core import (
    shards,
    states,
)
from core.records import ShardRecord, Snapshot
from core.spec import DatasetSpec
from core.states import ErrorType, JobState
from service.schemas import (
    Archive,
    JobError,
    JobPublic,
    Progress,
    Shard,
    Timings,
    WebhookStatus,
)


def as_time(value: float | str | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC) if value else None


def _state(snap: Snapshot) -> tuple[JobState, JobError | None]:
    record = snap.record
    error = (
        JobError(type=record.error_type, detail=record.error_detail or "")
        if record.error_type
        else None
    )
    if record.outcome is not None:
        return record.outcome, error
    if record.sharded:
        return (JobState.running if record.started_at else JobState.queued), error
    if snap.rq_status is None:
        lost = JobError(type=ErrorType.lost, detail="the job's queue entry expired or was removed")
        return JobState.failed, error or lost
    state = states.from_rq(snap.rq_status)
    if state is JobState.failed and error is None:
        error = JobError(type=ErrorType.internal, detail="the job failed")
    return state, error


def _progress(snap: Snapshot, state: JobState, spec: DatasetSpec) -> Progress:
    record = snap.record
    written, generated = record.written, record.generated
    if record.sharded and record.outcome is None:
        written = sum(s.written for s in snap.shards)
        generated = sum(s.generated for s in snap.shards)
    total: int | None = record.total or None
    if total is None and state is JobState.succeeded:
        total = written  # a time-budget job: its size is known once it ends
    rate = eta = None
    if record.started_at and state is JobState.running:
        elapsed = max(time.time() - record.started_at, 1e-6)
        rate = written / elapsed if written else None
        if spec.budget_seconds is not None:
            eta = max(spec.budget_seconds - elapsed, 0.0)
        elif rate and total is not None:
            eta = (total - written) / rate
    elif record.started_at and record.finished_at:
        elapsed = max(record.finished_at - record.started_at, 1e-6)
        rate = written / elapsed if written else None
    return Progress(
        generated=generated,
        written=written,
        total=total,
        images_per_second=round(rate, 3) if rate else None,
        eta_seconds=round(eta, 1) if eta is not None else None,
        ipc_reached=record.ipc_reached,
    )


def view(snap: Snapshot, *, archive_url: str) -> JobPublic:
    """The public view of a job, from its snapshot alone."""
    record = snap.record
    state, error = _state(snap)
    spec = DatasetSpec.model_validate_json(record.request)
    archive = None
    if state is JobState.succeeded and record.archive_sha256 and record.archive_size is not None:
        archive = Archive(
            url=archive_url, size_bytes=record.archive_size, sha256=record.archive_sha256
        )
    timings = None
    if record.seconds_total is not None:
        timings = Timings(
            seconds_total=record.seconds_total,
            seconds_sampling=record.seconds_sampling or 0.0,
            seconds_assembling=record.seconds_assembling,
        )
    return JobPublic(
        id=record.id,
        state=state,
        created_at=as_time(record.created_at) or dt.datetime.now(dt.UTC),
        started_at=as_time(record.started_at),
        finished_at=as_time(record.finished_at),
        request=spec,
        progress=_progress(snap, state, spec),
        queue_position=snap.queue_position if state is JobState.queued else None,
        cancel_requested=record.cancel_requested,
        worker=record.worker,
        attempts=(
            max((s.attempts for s in snap.shards), default=0) if record.sharded else record.attempts
        ),
        shards=[_shard_view(spec, s) for s in snap.shards] if record.sharded else None,
        last_interruption=record.last_interruption,
        webhook=(
            WebhookStatus.model_validate(
                {"url": record.callback_url, "attempts": snap.webhook_attempts}
            )
            if record.callback_url
            else None
        ),
        error=error,
        archive=archive,
        timings=timings,
    )


def _shard_view(request: DatasetSpec, shard: ShardRecord) -> Shard:
    first, last = shards.describe(request, shard)
    return Shard(
        index=shard.index,
        state=shard.state.value,
        first_class=first,
        last_class=last,
        images=shard.images,
        generated=shard.generated,
        written=shard.written,
        worker=shard.worker,
        attempts=shard.attempts,
        started_at=as_time(shard.started_at),
        finished_at=as_time(shard.finished_at),
        last_interruption=shard.last_interruption,
        error=shard.error,
    )
