"""Typed job and shard records on a real Redis: one round trip per view, one write path for
a job in one piece and for a shard."""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis
from rq import Queue

from core import keys, records, shards
from core.records import Piece
from core.spec import DatasetSpec
from core.states import JobState
from tests.conftest import CountingConnection

SPEC = DatasetSpec.model_validate(
    {"labels": [f"c{i}" for i in range(4)], "ipc": 20, "augment": {"policy": "none"}}
)


def _job(redis: Redis, *, owner: str = "o", ttl: int = 60, **extra: str | int) -> str:
    job_id = uuid.uuid4().hex
    records.create(
        redis,
        job_id,
        request=SPEC.model_dump(mode="json"),
        total=SPEC.total_images,
        ttl=ttl,
        owner=owner,
        extra=extra,
    )
    return job_id


def _sharded(redis: Redis, queue: str) -> tuple[str, list[shards.Shard]]:
    job_id = _job(redis)
    plan = shards.plan(SPEC, shard_images=20, batch_size=4)
    shards.create(redis, job_id, plan, queue=queue)
    return job_id, plan


def test_a_record_reads_back_typed(redis: Redis) -> None:
    job_id = _job(redis, callback_url="https://example.org/hook", webhook_queue="hooks")
    record = records.read(redis, job_id)
    assert record is not None
    assert record.id == job_id and record.owner == "o" and record.ttl == 60
    assert record.total == 80 and record.generated == record.written == 0
    assert record.outcome is None and not record.cancel_requested and not record.ending
    assert not record.sharded and record.callback_url == "https://example.org/hook"
    assert DatasetSpec.model_validate_json(record.request) == SPEC
    assert records.read(redis, uuid.uuid4().hex) is None


def test_a_view_is_one_round_trip_for_a_job_and_a_sharded_job(redis: Redis, counted: Redis) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    whole = _job(redis)
    Queue(queue, connection=redis).enqueue(keys.DISTILL_TASK, {}, job_id=whole)
    sharded, plan = _sharded(redis, queue)
    Queue(queue, connection=redis).enqueue(
        keys.SHARD_TASK, sharded, 0, job_id=keys.shard_entry(sharded, 0)
    )

    before = CountingConnection.sends
    one = records.snapshot(counted, whole, queue=queue)
    assert CountingConnection.sends - before == 1
    assert one is not None and one.rq_status == "queued" and one.queue_position == 0
    assert one.shards == []

    before = CountingConnection.sends
    many = records.snapshot(counted, sharded, queue=queue)
    assert CountingConnection.sends - before == 1
    assert many is not None and many.record.shards == len(plan) == len(many.shards)
    assert [s.index for s in many.shards] == list(range(len(plan)))
    assert [(s.start, s.stop, s.images) for s in many.shards] == [
        (p.start, p.stop, p.images) for p in plan
    ]
    assert many.queue_position == 1  # its first shard, behind the whole job
    assert all(s.state is JobState.queued for s in many.shards)

    before = CountingConnection.sends
    page = records.snapshots(counted, [whole, sharded, uuid.uuid4().hex], queue=queue)
    assert CountingConnection.sends - before == 1
    assert [s.record.id if s else None for s in page] == [whole, sharded, None]


def test_a_job_and_a_shard_share_one_write_path(redis: Redis) -> None:
    job_id, _ = _sharded(redis, "q")
    whole = _job(redis)
    for piece in (Piece(whole), Piece(job_id, 2)):
        records.mark_running(redis, piece, worker="w1", partial="/tmp/x.part")
        records.save_progress(redis, piece, generated=4, written=4, added=(4, 4))
        row = records.read_piece(redis, piece)
        assert row is not None
        assert (row.worker, row.partial, row.attempts) == ("w1", "/tmp/x.part", 1)
        assert (row.generated, row.written) == (4, 4) and row.started_at is not None
        records.mark_requeued(redis, piece, reason="worker w1 shut down")
        again = records.read_piece(redis, piece)
        assert again is not None
        assert again.started_at is None and again.partial is None
        assert (again.generated, again.written) == (0, 0)
        assert again.last_interruption == "worker w1 shut down"
    shard = records.read_piece(redis, Piece(job_id, 2))
    assert isinstance(shard, records.ShardRecord) and shard.state is JobState.queued
    # The job started with its first running shard; other shards are untouched.
    parent = records.read(redis, job_id)
    assert parent is not None and parent.started_at is not None
    assert [s.attempts for s in records.read_shards(redis, job_id)][:3] == [0, 0, 1]


def test_an_outcome_is_recorded_once_and_outlives_the_job_as_a_tombstone(redis: Redis) -> None:
    job_id, _ = _sharded(redis, "q")
    assert job_id in shards.active(redis)
    fields = {"error_type": "internal", "error_detail": "boom"}
    assert records.finish(redis, job_id, outcome=JobState.failed, fields=fields)
    assert not records.finish(redis, job_id, outcome=JobState.succeeded)
    record = records.read(redis, job_id)
    assert record is not None and record.outcome is JobState.failed
    assert record.error_detail == "boom" and record.ending
    assert record.expires_at is not None and record.expires_at == pytest.approx(
        time.time() + 60, abs=5
    )
    assert not record.expired() and record.expired(now=record.expires_at + 1)
    keep = 60 + records.TOMBSTONE_S
    for key in (keys.job(job_id), keys.shards(job_id)):
        assert keep - 5 <= redis.ttl(key) <= keep
    assert job_id not in shards.active(redis)


def test_forget_undoes_create(redis: Redis) -> None:
    job_id = _job(redis, owner="forgetful")
    records.forget(redis, job_id, "forgetful")
    assert records.read(redis, job_id) is None
    assert redis.zscore(keys.jobs_index("forgetful"), job_id) is None
