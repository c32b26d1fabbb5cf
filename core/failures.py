"""RQ failure callbacks: record why a piece of work failed, remove its partial file.

RQ calls them in the worker when an entry raises or times out, and in whichever process
cleans up a started-job registry when a worker died mid-job (the maintenance loop of any
process, ``core.maintenance``), so a lost job ends ``failed`` with a reason, or goes back to
the queue, instead of staying ``running``. One callback serves a job in one piece, a shard
and an assembly: they differ only in which record holds the attempt. No torch here.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from core import evaluations, keys, records, shards
from core.errors import InsufficientSpace
from core.records import JobRecord, Piece, ShardRecord
from core.spec import DatasetSpec
from core.states import ErrorType, JobState

log = logging.getLogger("distill.jobs")


def describe_failure(
    exc_type: type[BaseException] | None, exc: BaseException | None
) -> tuple[ErrorType, str]:
    """A public ``(type, detail)`` pair for a failure."""
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return ErrorType.worker_lost, "the worker running this job stopped sending heartbeats"
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return ErrorType.timeout, f"the job ran longer than its time limit: {exc}"
    if isinstance(exc, InsufficientSpace):
        return ErrorType.disk_full, exc.detail
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ErrorType.disk_full, "no space left on the data volume while writing the archive"
    if exc_type is not None and exc_type.__name__ == "ValidationError":
        return ErrorType.invalid_request, str(exc).strip()
    # An error that knows its public type says so (the worker's PartUnavailable, say).
    declared = getattr(exc, "error_type", None)
    if isinstance(declared, str) and declared in ErrorType.__members__:
        return ErrorType(declared), str(exc).strip() or declared
    name = exc_type.__name__ if exc_type is not None else "Error"
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else name
    return ErrorType.internal, f"{name}: {text}"


def piece_of(job: Any) -> tuple[Piece, bool]:
    """The piece an RQ entry runs, and whether it is a sharded job's assembly."""
    if job.func_name == keys.SHARD_TASK:
        job_id, index = job.args
        return Piece(str(job_id), int(index)), False
    if job.func_name == keys.ASSEMBLE_TASK:
        return Piece(str(job.args[0])), True
    return Piece(job.id), False


def _where(parent: JobRecord, row: JobRecord | ShardRecord | None, assembly: bool) -> str:
    """``shard 3, classes 4-5: `` for a shard, ``assembly: `` for an assembly, else nothing."""
    if assembly:
        return "assembly: "
    if not isinstance(row, ShardRecord):
        return ""
    first, last = shards.describe(DatasetSpec.model_validate_json(parent.request), row)
    classes = f"classes {first}-{last}" if last != first else f"class {first}"
    return f"shard {row.index}, {classes}: "


def on_failure(
    job: Any,
    connection: Redis,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Drop the partial file; re-queue a lost worker's piece while attempts are left, else fail
    the job with the reason (a shard's failure fails its whole job and stops the others)."""
    piece, assembly = piece_of(job)
    parent = records.read(connection, piece.job_id)
    if parent is None:
        return  # forgotten meanwhile: nothing to record
    row = parent if assembly else records.read_piece(connection, piece)
    if row is not None and row.partial:
        # Its path is in the record: the process running this may not be the one that ran it.
        Path(row.partial).unlink(missing_ok=True)
    lost = exc_type is not None and issubclass(exc_type, AbandonedJobError)
    worker = (row.worker if row is not None else None) or "unknown"
    attempts = (row.attempts if row is not None else 0) or 1
    if lost and job.retries_left and not parent.ending:
        # RQ re-queues it right after this callback (the entry's Retry policy).
        reason = f"worker {worker} lost on attempt {attempts}"
        if assembly:
            shards.mark_assembly(connection, piece.job_id, JobState.queued)
        else:
            records.mark_requeued(connection, piece, reason=reason)
        return
    error_type, detail = describe_failure(exc_type, exc)
    if lost:
        detail = (
            f"worker {worker} stopped sending heartbeats (it died) on attempt {attempts}; "
            "no attempts left"
        )
    if piece.index is not None:
        state = JobState.canceled if parent.ending else JobState.failed
        shards.mark_stopped(connection, piece.job_id, piece.index, state=state, error=detail)
    if parent.ending and parent.outcome is None:
        # Canceled while it ran: a sharded job ends once nothing of it runs.
        if not parent.sharded:
            records.finish(connection, piece.job_id, outcome=JobState.canceled)
        elif shards.end_if_stopped(connection, piece.job_id):
            shards.enqueue_cleanup(connection, job.origin, piece.job_id)
        return
    ended = records.finish(
        connection,
        piece.job_id,
        outcome=JobState.failed,
        fields={
            "error_type": error_type.value,
            "error_detail": f"{_where(parent, row, assembly)}{detail}"[:2000],
        },
    )
    if ended and parent.sharded:
        shards.stop_all(connection, piece.job_id)
        shards.enqueue_cleanup(connection, job.origin, piece.job_id)


def on_evaluation_failure(
    job: Any,
    connection: Redis,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """The evaluation failed, with its reason."""
    detail = f"{getattr(exc_type, '__name__', 'Error')}: {exc}".strip()
    evaluations.set_fields(
        connection, job.id, state="failed", finished_at=repr(time.time()), error=detail[:2000]
    )
