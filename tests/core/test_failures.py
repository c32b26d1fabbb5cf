"""The one failure callback, for a job in one piece, a shard and an assembly, called as RQ
calls it (a real RQ entry on a real Redis)."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from core import failures, keys, records, shards
from core.errors import InsufficientSpace
from core.records import Piece
from core.spec import DatasetSpec
from core.states import ErrorType, JobState

SPEC = DatasetSpec.model_validate(
    {"labels": [f"c{i}" for i in range(4)], "ipc": 20, "augment": {"policy": "none"}}
)
LOST = AbandonedJobError("abandoned")


@pytest.fixture
def queue(redis: Redis) -> Queue:
    return Queue(f"failures-{uuid.uuid4().hex[:6]}", connection=redis)


def _job(redis: Redis, *, sharded: bool, queue: Queue) -> str:
    job_id = uuid.uuid4().hex
    records.create(redis, job_id, request=SPEC.model_dump(mode="json"), total=80, ttl=60, owner="o")
    if sharded:
        plan = shards.plan(SPEC, shard_images=20, batch_size=4)
        shards.create(redis, job_id, plan, queue=queue.name)
    return job_id


def _entry(queue: Queue, func: str, *args: object, job_id: str, retries: int) -> Job:
    job = queue.create_job(func, args=args, job_id=job_id)
    job.retries_left = retries
    return job


def _running(redis: Redis, piece: Piece, tmp_path: Path) -> Path:
    partial = tmp_path / f"{uuid.uuid4().hex}.part"
    partial.write_bytes(b"half an archive")
    records.mark_running(redis, piece, worker="w1", partial=str(partial))
    return partial


def test_a_lost_job_with_attempts_left_goes_back_to_the_queue(
    redis: Redis, queue: Queue, tmp_path: Path
) -> None:
    job_id = _job(redis, sharded=False, queue=queue)
    partial = _running(redis, Piece(job_id), tmp_path)
    entry = _entry(queue, keys.DISTILL_TASK, {}, job_id=job_id, retries=1)
    failures.on_failure(entry, redis, AbandonedJobError, LOST, None)
    record = records.read(redis, job_id)
    assert record is not None and record.outcome is None
    assert record.last_interruption == "worker w1 lost on attempt 1"
    assert record.started_at is None and not partial.exists()


def test_a_lost_job_without_attempts_fails_naming_the_worker(
    redis: Redis, queue: Queue, tmp_path: Path
) -> None:
    job_id = _job(redis, sharded=False, queue=queue)
    partial = _running(redis, Piece(job_id), tmp_path)
    entry = _entry(queue, keys.DISTILL_TASK, {}, job_id=job_id, retries=0)
    failures.on_failure(entry, redis, AbandonedJobError, LOST, None)
    record = records.read(redis, job_id)
    assert record is not None and record.outcome is JobState.failed
    assert record.error_type == ErrorType.worker_lost
    assert record.error_detail is not None and "worker w1" in record.error_detail
    assert "no attempts left" in record.error_detail
    assert not partial.exists()


def test_a_canceled_job_whose_worker_died_ends_canceled(
    redis: Redis, queue: Queue, tmp_path: Path
) -> None:
    job_id = _job(redis, sharded=False, queue=queue)
    _running(redis, Piece(job_id), tmp_path)
    records.request_cancel(redis, job_id)
    entry = _entry(queue, keys.DISTILL_TASK, {}, job_id=job_id, retries=1)
    failures.on_failure(entry, redis, AbandonedJobError, LOST, None)
    record = records.read(redis, job_id)
    assert record is not None and record.outcome is JobState.canceled


def test_a_lost_shard_is_retried_alone(redis: Redis, queue: Queue, tmp_path: Path) -> None:
    job_id = _job(redis, sharded=True, queue=queue)
    partial = _running(redis, Piece(job_id, 1), tmp_path)
    entry = _entry(queue, keys.SHARD_TASK, job_id, 1, job_id=keys.shard_entry(job_id, 1), retries=1)
    failures.on_failure(entry, redis, AbandonedJobError, LOST, None)
    rows = records.read_shards(redis, job_id)
    assert rows[1].state is JobState.queued
    assert rows[1].last_interruption == "worker w1 lost on attempt 1"
    record = records.read(redis, job_id)
    assert record is not None and record.outcome is None and not partial.exists()


def test_a_failed_shard_fails_its_job_and_stops_the_other_shards(
    redis: Redis, queue: Queue, tmp_path: Path
) -> None:
    job_id = _job(redis, sharded=True, queue=queue)
    _running(redis, Piece(job_id, 1), tmp_path)
    entry = _entry(queue, keys.SHARD_TASK, job_id, 1, job_id=keys.shard_entry(job_id, 1), retries=1)
    failures.on_failure(entry, redis, RuntimeError, RuntimeError("decoder exploded"), None)
    record = records.read(redis, job_id)
    assert record is not None and record.outcome is JobState.failed
    assert record.error_type == ErrorType.internal
    # Shard 1 covers samples 20..39: class 1 (20 samples per class).
    assert record.error_detail == "shard 1, class 1: RuntimeError: decoder exploded"
    rows = records.read_shards(redis, job_id)
    assert rows[1].state is JobState.failed and rows[1].error == "RuntimeError: decoder exploded"
    assert {r.state for i, r in enumerate(rows) if i != 1} == {JobState.canceled}
    # A worker removes the parts (the process noticing the failure may not reach the store).
    assert keys.cleanup_entry(job_id) in queue.get_job_ids()


def test_a_lost_assembly_is_queued_again(redis: Redis, queue: Queue) -> None:
    job_id = _job(redis, sharded=True, queue=queue)
    shards.mark_assembly(redis, job_id, JobState.running, worker="w2", partial="/nonexistent")
    entry = _entry(queue, keys.ASSEMBLE_TASK, job_id, job_id=keys.assembly_entry(job_id), retries=1)
    failures.on_failure(entry, redis, AbandonedJobError, LOST, None)
    record = records.read(redis, job_id)
    assert record is not None and record.assembly is JobState.queued and record.outcome is None
    failures.on_failure(entry, redis, RuntimeError, RuntimeError("no space"), None)
    record = records.read(redis, job_id)
    assert record is not None and record.outcome is JobState.failed
    assert record.error_detail == "assembly: RuntimeError: no space"


@pytest.mark.parametrize(
    ("exc_type", "exc", "expected"),
    [
        (AbandonedJobError, LOST, ErrorType.worker_lost),
        (JobTimeoutException, JobTimeoutException("6 h"), ErrorType.timeout),
        (InsufficientSpace, InsufficientSpace("needs 9 GiB"), ErrorType.disk_full),
        (OSError, OSError(errno.ENOSPC, "full"), ErrorType.disk_full),
        (ValueError, ValueError("bad\nsecond line"), ErrorType.internal),
    ],
)
def test_failures_get_public_types(
    exc_type: type[BaseException], exc: BaseException, expected: ErrorType
) -> None:
    kind, detail = failures.describe_failure(exc_type, exc)
    assert kind is expected and detail and "\n" not in detail
