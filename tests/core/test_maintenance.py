"""The maintenance loop: one process per queue at a time, and a round that always ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from redis import Redis

from core import keys, maintenance, workers
from service.redis_server import EmbeddedRedis
from tests.conftest import TEST_ENV, make_settings


def test_one_process_at_a_time_does_a_round(
    redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, queue_name=f"m-{uuid.uuid4().hex[:6]}")
    lock = keys.maintenance_lock(settings.queue_name)
    redis.set(lock, "another process", ex=30)
    assert not maintenance.run_once(redis, settings)
    assert redis.get(lock) == b"another process"  # never taken from its holder
    redis.delete(lock)
    # A dead worker's name is pruned by the round that holds the lock, which then lets go.
    workers.publish(redis, "gone", queue=settings.queue_name, fields={"state": "ready"}, ttl=30)
    redis.delete(keys.worker("gone"))
    assert maintenance.run_once(redis, settings)
    assert redis.get(lock) is None
    assert not redis.sismember(keys.workers(settings.queue_name), "gone")


def test_the_store_is_swept_once_per_interval(
    redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url, tmp_path, queue_name=f"s-{uuid.uuid4().hex[:6]}", sweep_interval=3600
    )
    orphan = tmp_path / f"{uuid.uuid4().hex}.zip"  # an archive no record knows
    orphan.write_bytes(b"zip")
    assert maintenance.run_once(redis, settings)
    assert not orphan.exists()
    orphan.write_bytes(b"zip")
    assert maintenance.run_once(redis, settings)
    assert orphan.exists()  # not due again for an hour


def test_a_holder_that_dies_mid_round_frees_the_lock_within_one_heartbeat_ttl(
    redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url, tmp_path, queue_name=f"d-{uuid.uuid4().hex[:6]}", heartbeat_ttl=2
    )
    # A process takes the lock for a round, then is SIGKILLed before it can let go.
    child = (
        "import os, signal, sys; from redis import Redis; from core import maintenance;"
        "from core.settings import Settings;"
        "s = Settings(redis_url=sys.argv[1], queue_name=sys.argv[2], heartbeat_ttl=2,"
        " data_dir=sys.argv[3]);"
        "assert maintenance.take_lock(Redis.from_url(s.redis_url), s);"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", child, settings.redis_url, settings.queue_name, str(tmp_path)],
        env={**os.environ, **TEST_ENV},
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    died = time.monotonic()
    assert not maintenance.run_once(redis, settings)  # still held by the dead process
    while not maintenance.run_once(redis, settings):
        assert time.monotonic() - died < settings.heartbeat_ttl + 1.0, "lock never freed"
        time.sleep(0.1)


def test_the_sweep_removes_reference_sets_whose_record_is_gone(
    redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, queue_name=f"r-{uuid.uuid4().hex[:6]}")
    kept, gone = uuid.uuid4().hex, uuid.uuid4().hex
    for ref in (kept, gone):
        path = tmp_path / keys.reference_archive(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"zip")
    redis.hset(keys.reference(kept), mapping={"name": "kept"})
    try:
        assert maintenance.run_once(redis, settings)
        assert (tmp_path / keys.reference_archive(kept)).exists()
        assert not (tmp_path / keys.reference_archive(gone)).exists()
    finally:
        redis.delete(keys.reference(kept))
