"""The status a worker publishes names the job it runs now, and nothing once it is idle."""

from __future__ import annotations

from pathlib import Path

from redis import Redis
from rq import Queue
from rq.executions import cleanup_execution

from core import keys
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings
from worker.main import DistillWorker, StatusBeacon


def test_an_idle_worker_reports_no_job_even_when_read_mid_cleanup(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    redis = Redis.from_url(redis_server.url)
    queue = Queue("beacon", connection=redis)
    job = queue.enqueue(len, [1])
    worker = DistillWorker([queue], connection=redis, name="beacon-worker")
    beacon = StatusBeacon(redis, worker.name, make_settings(redis_server.url, tmp_path))
    beacon.worker = worker

    execution = worker.prepare_execution(job)
    beacon.publish()
    assert redis.hget(keys.worker(worker.name), "current_job") == job.id.encode()

    # RQ's cleanup drops the execution from the process at once and from Redis when the
    # pipeline runs; the beat thread may publish in between.
    with redis.pipeline() as pipe:
        cleanup_execution(worker, job, pipe, execution)
        beacon.publish()
        pipe.execute()
    beacon.publish()
    assert redis.hget(keys.worker(worker.name), "current_job") == b""
    assert worker.running_job_id() is None
