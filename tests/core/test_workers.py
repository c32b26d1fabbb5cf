"""The worker registry: a set per queue, statuses that expire, readers that only read."""

from __future__ import annotations

import time
import uuid

from fastapi.testclient import TestClient
from redis import Redis

from core import keys, workers
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings


def test_each_queue_sees_only_its_own_workers(redis: Redis) -> None:
    mine, theirs = f"mine-{uuid.uuid4().hex[:6]}", f"theirs-{uuid.uuid4().hex[:6]}"
    workers.publish(redis, "w-a", queue=mine, fields={"state": workers.READY, "pid": 1}, ttl=30)
    workers.publish(redis, "w-b", queue=mine, fields={"state": workers.LOADING}, ttl=30)
    workers.publish(redis, "w-c", queue=theirs, fields={"state": workers.READY}, ttl=30)
    live = workers.live(redis, mine, heartbeat_ttl=30)
    assert [(w.name, w.ready, w.queue) for w in live] == [("w-a", True, mine), ("w-b", False, mine)]
    assert live[0].pid == 1 and live[0].age() < 5
    assert workers.ready_count(redis, mine, heartbeat_ttl=30) == 1
    assert [w.name for w in workers.live(redis, theirs, heartbeat_ttl=30)] == ["w-c"]


def test_silent_workers_are_not_counted_and_maintenance_prunes_the_dead(redis: Redis) -> None:
    queue = f"prune-{uuid.uuid4().hex[:6]}"
    workers.publish(redis, "old", queue=queue, fields={"state": workers.READY}, ttl=1)
    workers.publish(redis, "new", queue=queue, fields={"state": workers.READY}, ttl=30)
    time.sleep(1.2)
    # Expired: the hash is gone, and readers skip the name without writing anything.
    assert [w.name for w in workers.live(redis, queue, heartbeat_ttl=30)] == ["new"]
    assert redis.sismember(keys.workers(queue), "old")
    assert workers.prune(redis, queue) == 1
    assert not redis.sismember(keys.workers(queue), "old")
    workers.unregister(redis, "new", queue=queue)
    assert workers.live(redis, queue, heartbeat_ttl=30) == []


def test_a_worker_of_another_deployment_does_not_make_readyz_ready(
    redis: Redis, redis_server: EmbeddedRedis, tmp_path: object
) -> None:
    settings = make_settings(redis_server.url, tmp_path, queue_name=f"alone-{uuid.uuid4().hex[:6]}")  # type: ignore[arg-type]
    workers.publish(
        redis, "elsewhere", queue="another-deployment", fields={"state": workers.READY}, ttl=30
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["workers"] == []
        workers.publish(
            redis, "here", queue=settings.queue_name, fields={"state": workers.READY}, ttl=30
        )
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert [w["name"] for w in ready.json()["workers"]] == ["here"]
    workers.unregister(redis, "here", queue=settings.queue_name)
