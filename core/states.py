"""The names of states and error types that records hold and the API shows.

RQ's own states never leave ``core``: ``public_state`` maps them.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Public job states; RQ's internal states never appear in the API."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.canceled)


#: The outcomes a job record can hold (its terminal states).
OUTCOMES = (JobState.succeeded, JobState.failed, JobState.canceled)


class ErrorType(StrEnum):
    """``error.type`` of a failed job."""

    #: The worker running it stopped sending heartbeats, and no attempts were left.
    worker_lost = "worker_lost"
    #: It ran longer than ``DISTILL_JOB_TIMEOUT``.
    timeout = "timeout"
    #: The data volume could not hold its archive.
    disk_full = "disk_full"
    #: The worker refused the request (a payload of another version, say).
    invalid_request = "invalid_request"
    #: Its queue entry expired or was removed before it ended.
    lost = "lost"
    #: Anything else; the detail names the exception.
    internal = "internal"


# RQ's statuses (``rq.job.JobStatus`` values) as the caller sees them, for a job without an
# outcome in its record. RQ "finished" without our outcome is a job that stopped for a worker
# shutdown and is being put back in the queue.
_FROM_RQ = {
    "queued": JobState.queued,
    "deferred": JobState.queued,
    "scheduled": JobState.queued,
    "started": JobState.running,
    "finished": JobState.queued,
    "failed": JobState.failed,
    "stopped": JobState.failed,
    "canceled": JobState.canceled,
}


def from_rq(status: str) -> JobState:
    """The public state for one of RQ's statuses (unknown ones count as queued)."""
    return _FROM_RQ.get(status, JobState.queued)
