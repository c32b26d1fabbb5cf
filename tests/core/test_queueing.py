"""Fair places in a real RQ queue: each owner's n-th waiting entry after every other owner's
n-th, moved in one step; and the options every entry is enqueued with."""

from __future__ import annotations

import uuid

from redis import Redis
from rq import Queue

from core import keys, queueing, records
from tests.conftest import make_settings


def _submit(redis: Redis, queue: Queue, owner: str) -> str:
    job_id = uuid.uuid4().hex
    records.create(redis, job_id, request={}, total=1, ttl=60, owner=owner)
    queue.enqueue(keys.DISTILL_TASK, {}, job_id=job_id)
    queueing.place(redis, queue.key, job_id, owner)
    return job_id


def test_owners_take_turns_and_nothing_is_lost_or_doubled(redis: Redis) -> None:
    queue = Queue(f"fair-{uuid.uuid4().hex[:6]}", connection=redis)
    owner_of: dict[str, str] = {}
    for owner in "aaab":
        owner_of[_submit(redis, queue, owner)] = owner
    # b's first entry goes behind a's first, not behind all three.
    assert "".join(owner_of[i] for i in queue.get_job_ids()) == "abaa"
    for owner in "ab":
        owner_of[_submit(redis, queue, owner)] = owner
    ids = queue.get_job_ids()
    assert "".join(owner_of[i] for i in ids) == "ababaa"
    assert sorted(ids) == sorted(owner_of)


def test_a_shard_counts_for_its_jobs_owner(redis: Redis) -> None:
    queue = Queue(f"fair-{uuid.uuid4().hex[:6]}", connection=redis)
    first = _submit(redis, queue, "a")
    _submit(redis, queue, "a")
    big = uuid.uuid4().hex
    records.create(redis, big, request={}, total=1, ttl=60, owner="b")
    entry = keys.shard_entry(big, 0)
    queue.enqueue(keys.SHARD_TASK, big, 0, job_id=entry)
    assert queueing.place(redis, queue.key, entry, "b") == 1
    assert queue.get_job_ids()[:2] == [first, entry]


def test_an_entry_a_worker_took_is_not_placed(redis: Redis) -> None:
    queue = Queue(f"fair-{uuid.uuid4().hex[:6]}", connection=redis)
    assert queueing.place(redis, queue.key, uuid.uuid4().hex, "a") is None


def test_every_entry_gets_the_one_failure_callback_and_retries_for_a_lost_worker(
    tmp_path: object,
) -> None:
    settings = make_settings("redis://unused", tmp_path, max_attempts=3, job_timeout=77)  # type: ignore[arg-type]
    options = queueing.enqueue_options(settings)
    assert options["on_failure"].name == keys.ON_FAILURE == "core.failures.on_failure"
    assert options["retry"].max == 2 and options["job_timeout"] == 77
    once = queueing.enqueue_options(settings.model_copy(update={"max_attempts": 1}))
    assert once["retry"] is None
