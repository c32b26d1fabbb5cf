"""RQ failure callback: record why a job failed and remove its partial archive. No torch here.

RQ calls it in the worker when the job raises or times out, and in whichever process cleans
up the started-job registry when a worker died mid-job (the API does so on every read), so a
lost job ends ``failed`` with a reason instead of staying ``running``.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from core import records
from core.errors import InsufficientSpace


def describe_failure(
    exc_type: type[BaseException] | None, exc: BaseException | None
) -> tuple[str, str]:
    """A public ``(type, detail)`` pair for a job failure."""
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return "worker_lost", "the worker running this job stopped sending heartbeats (it died)"
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return "timeout", f"the job ran longer than its time limit: {exc}"
    if isinstance(exc, InsufficientSpace):
        return "disk_full", exc.detail
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk_full", "no space left on the data volume while writing the archive"
    if exc_type is not None and exc_type.__name__ == "ValidationError":
        return "invalid_request", str(exc).strip()
    name = exc_type.__name__ if exc_type is not None else "Error"
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else name
    return "internal", f"{name}: {text}"


def _drop_partial(row: Mapping[str, str], exc_type: type[BaseException] | None) -> bool:
    """Remove the failed run's partial file (its path is in its record, since the process
    running the callback may not be the one that ran the job); True if the worker was lost."""
    partial = row.get("partial")
    if partial:
        Path(partial).unlink(missing_ok=True)
    return exc_type is not None and issubclass(exc_type, AbandonedJobError)


def on_failure(
    job: Any,
    connection: Any,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Drop the partial archive, then record the failure, or the re-queue of a lost job."""
    record = records.read(connection, job.id)
    lost = _drop_partial(record, exc_type)
    worker = record.get("worker", "unknown")
    attempts = int(record.get("attempts", 1))
    if lost and job.retries_left:
        # RQ re-queues it right after this callback (the job's Retry policy).
        records.requeued(connection, job.id, reason=f"worker {worker} lost on attempt {attempts}")
        return
    error_type, detail = describe_failure(exc_type, exc)
    if lost:
        detail = (
            f"worker {worker} stopped sending heartbeats (it died) on attempt {attempts}; "
            "no attempts left"
        )
    records.finish(
        connection,
        job.id,
        outcome=records.FAILED,
        fields={"error_type": error_type, "error_detail": detail[:2000]},
    )


def on_shard_failure(
    job: Any,
    connection: Any,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """A shard (or the assembly) failed: retry it if its worker was lost and runs are left,
    else fail the whole job with the shard's reason and stop its other shards."""
    from core import shards  # no cycle at import time: shards imports records

    job_id, *rest = job.args
    index: int | None = int(rest[0]) if rest else None
    parent = records.read(connection, job_id)
    row = shards.read(connection, job_id, index) if index is not None else parent
    lost = _drop_partial(row, exc_type)
    worker = row.get("worker", "unknown")
    attempts = int(row.get("attempts", 1))
    if lost and job.retries_left and not records.ending_record(parent):
        reason = f"worker {worker} lost on attempt {attempts}"
        if index is not None:
            shards.mark_requeued(connection, job_id, index, reason=reason)
        else:
            connection.hset(records.job_key(job_id), "assembly", shards.QUEUED)
        return
    error_type, detail = describe_failure(exc_type, exc)
    if lost:
        detail = f"worker {worker} stopped sending heartbeats (it died); no attempts left"
    if index is not None:
        state = shards.CANCELED if records.ending_record(parent) else shards.FAILED
        shards.mark_stopped(connection, job_id, index, state=state, error=detail)
    if records.ending_record(parent) and "outcome" not in parent:
        # Canceled while this shard ran: the job ends canceled once nothing runs.
        if shards.end_if_stopped(connection, job_id):
            shards.enqueue_cleanup(connection, job.origin, job_id)
        return
    where = "assembly"
    if index is not None:
        classes = ""
        request = parent.get("request")
        if request:
            from core.spec import DatasetSpec

            first, last = shards.describe(DatasetSpec.model_validate_json(request), row)
            classes = f", classes {first}-{last}" if last != first else f", class {first}"
        where = f"shard {index}{classes}"
    if records.finish(
        connection,
        job_id,
        outcome=records.FAILED,
        fields={"error_type": error_type, "error_detail": f"{where}: {detail}"[:2000]},
    ):
        shards.stop_all(connection, job_id)
        shards.enqueue_cleanup(connection, job.origin, job_id)
