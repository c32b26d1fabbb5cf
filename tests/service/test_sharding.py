"""One job across several workers: shards run in parallel, the caller sees one job, and the
archive is byte for byte the one a single worker makes in one piece."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from core import keys
from core.settings import Settings
from service.app import create_app
from service.redis_server import EmbeddedRedis
from service.stack import Stack
from tests.conftest import (
    TEST_ENV,
    S3Server,
    make_settings,
    start_worker,
    stop_worker,
    wait_for,
    with_model,
)

LABELS = [f"class {i}" for i in range(20)]
#: 20 classes x ipc 10 (2 sampled + 8 copies each) = 200 images; 40 per shard = 5 shards.
JOB = {"labels": LABELS, "ipc": 10, "seed": 7, "formats": ["imagefolder", "tensors"]}
SHARD_IMAGES = 40


def api(stack: Stack, **overrides: Any) -> TestClient:
    """An in-process API on the stack's settings (``overrides`` changed)."""
    return TestClient(create_app(stack.settings.model_copy(update=overrides)))


def _settings(redis_server: EmbeddedRedis, data: Path, queue: str, **extra: Any) -> Settings:
    return make_settings(
        redis_server.url,
        data,
        queue_name=queue,
        shard_images=SHARD_IMAGES,
        torch_threads=1,
        heartbeat_ttl=3,
        **extra,
    )


def _start(settings: Settings, model: Path, logs: Path, count: int) -> Stack:
    stack = Stack(with_model(settings, model), logs=logs, env=TEST_ENV)
    for _ in range(count):
        stack.start_worker()
    return stack


@pytest.fixture(scope="module")
def pair(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Two worker processes on one queue (one torch thread each)."""
    base = tmp_path_factory.mktemp("sharding")
    stack = _start(_settings(redis_server, base / "data", "shards"), tiny_model, base, 2)
    yield stack
    stack.close()


def _archive(client: TestClient, job: dict[str, Any]) -> bytes:
    response = client.get(f"/v1/jobs/{job['id']}/archive")
    assert response.status_code == 200, response.text
    assert hashlib.sha256(response.content).hexdigest() == job["archive"]["sha256"]
    return response.content


def test_a_sharded_job_runs_on_both_workers_and_equals_the_one_piece_archive(
    pair: Stack,
) -> None:
    with api(pair) as client, api(pair, shard_images=100_000) as whole:
        job = client.post("/v1/jobs", json=JOB).json()
        assert job["shards"] is not None and len(job["shards"]) == 5
        done = wait_for(client.get, job["id"], timeout=180)
        assert done["state"] == "succeeded", done
        sharded = _archive(client, done)

        reference = whole.post("/v1/jobs", json=JOB).json()
        assert reference["shards"] is None
        ref_done = wait_for(whole.get, reference["id"], timeout=180)
        assert ref_done["state"] == "succeeded", ref_done
        one_piece = _archive(whole, ref_done)

    workers = {s["worker"] for s in done["shards"]}
    assert len(workers) == 2, done["shards"]
    assert all(s["state"] == "succeeded" and s["written"] == s["images"] for s in done["shards"])
    assert [(s["first_class"], s["last_class"]) for s in done["shards"]] == [
        (0, 3),
        (4, 7),
        (8, 11),
        (12, 15),
        (16, 19),
    ]
    assert done["progress"]["written"] == done["progress"]["total"] == 200
    assert done["timings"]["seconds_assembling"] is not None

    # Same members in the same (canonical) order with the same bytes: the whole zip is equal.
    with zipfile.ZipFile(io.BytesIO(sharded)) as a, zipfile.ZipFile(io.BytesIO(one_piece)) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            assert a.read(name) == b.read(name), name
        names = [n for n in a.namelist() if n.endswith(".png") and n.startswith("train/")]
        assert names == sorted(names) and len(names) == 200
    assert sharded == one_piece
    # Parts are gone from the store once the archive is published.
    assert not list((pair.settings.data_dir / "parts").glob(f"{job['id']}/*"))


def _two_shards_running(client: TestClient, job_id: str) -> dict[str, Any]:
    def both(job: dict[str, Any]) -> bool:
        running = [s for s in job["shards"] if s["state"] == "running" and s["written"] > 0]
        return len({s["worker"] for s in running}) == 2

    return wait_for(client.get, job_id, until=both, timeout=120)


def _idle(redis: Redis, names: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = {
            name: (redis.hget(keys.worker(name), "current_job") or b"").decode() for name in names
        }
        if not any(current.values()):
            return
        time.sleep(0.1)
    pytest.fail(f"workers still busy: {current}")


BIG = {"labels": LABELS, "ipc": 100, "augment": {"policy": "none"}}  # 2,000 images, 50 shards


def test_cancel_stops_every_shard_and_removes_the_parts(pair: Stack) -> None:
    redis = Redis.from_url(pair.settings.redis_url)
    with api(pair) as client:
        job = client.post("/v1/jobs", json=BIG).json()
        running = _two_shards_running(client, job["id"])
        answer = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert answer.status_code == 200
        final = wait_for(client.get, job["id"], timeout=30)
        assert final["state"] == "canceled", final
        _idle(redis, {s["worker"] for s in running["shards"] if s["worker"]})
        final = client.get(f"/v1/jobs/{job['id']}").json()
    states = {s["state"] for s in final["shards"]}
    assert "running" not in states and "queued" not in states, final["shards"]
    assert "canceled" in states
    assert final["progress"]["written"] < final["progress"]["total"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        list((pair.settings.data_dir / "parts" / job["id"]).glob("*.zip"))
        or list(pair.settings.data_dir.rglob("*.part"))
    ):
        time.sleep(0.1)
    assert not list((pair.settings.data_dir / "parts" / job["id"]).glob("*.zip"))
    assert not list(pair.settings.data_dir.rglob("*.part"))
    assert not (pair.settings.data_dir / f"{job['id']}.zip").exists()


def test_a_small_job_is_not_starved_by_a_large_one(pair: Stack) -> None:
    with api(pair) as client:
        big = client.post("/v1/jobs", json=BIG).json()
        _two_shards_running(client, big["id"])
        small = client.post(
            "/v1/jobs", json={"labels": ["cat", "dog"], "ipc": 5, "augment": {"policy": "none"}}
        ).json()
        assert small["shards"] is None
        small_done = wait_for(client.get, small["id"], timeout=120)
        big_now = client.get(f"/v1/jobs/{big['id']}").json()
        assert small_done["state"] == "succeeded"
        assert big_now["state"] == "running", "the large job ended before the small one"
        waiting = [s for s in big_now["shards"] if s["state"] == "queued"]
        waited = dt_seconds(small_done["started_at"]) - dt_seconds(small_done["created_at"])
        print(
            f"small job waited {waited:.2f} s behind a {len(big_now['shards'])}-shard job; "
            f"{len(waiting)} of its shards were still waiting"
        )
        assert len(waiting) > 10
        client.post(f"/v1/jobs/{big['id']}/cancel")
        wait_for(client.get, big["id"], timeout=30)


def dt_seconds(value: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(value).timestamp()


@pytest.mark.parametrize("attempts", [2, 1])
def test_a_killed_worker_s_shard_is_retried_or_fails_the_job(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path, attempts: int
) -> None:
    settings = _settings(
        redis_server, tmp_path / "data", f"shard-kill-{attempts}", max_attempts=attempts
    )
    stack = _start(settings, tiny_model, tmp_path, 2)
    body = {**JOB, "ipc": 50, "augment": {"policy": "none"}}  # 1,000 images, 25 shards
    try:
        with api(stack) as client:
            job = client.post("/v1/jobs", json=body).json()
            running = _two_shards_running(client, job["id"])
            victim_name = next(s["worker"] for s in running["shards"] if s["state"] == "running")
            victim = next(w for w in stack.workers if f".{w.pid}." in victim_name)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            final = wait_for(client.get, job["id"], timeout=180)
            if attempts == 2:
                assert final["state"] == "succeeded", final
                retried = [s for s in final["shards"] if s["attempts"] == 2]
                assert retried and all(s["worker"] != victim_name for s in retried)
                assert any(victim_name in (s["last_interruption"] or "") for s in retried)
                data = _archive(client, final)
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    pngs = [n for n in archive.namelist() if n.endswith(".png")]
                    assert len(pngs) == 1000 + 1  # + preview.png
                with api(stack, shard_images=100_000) as whole:
                    ref = whole.post("/v1/jobs", json=body).json()
                    ref = wait_for(whole.get, ref["id"], timeout=180)
                assert ref["archive"]["sha256"] == final["archive"]["sha256"]
            else:
                assert final["state"] == "failed", final
                assert final["error"]["type"] == "worker_lost"
                assert final["error"]["detail"].startswith("shard ")
                assert victim_name in final["error"]["detail"]
                deadline = time.monotonic() + 20
                parts = settings.data_dir / "parts" / job["id"]
                while time.monotonic() < deadline and list(parts.glob("*.zip")):
                    time.sleep(0.2)
                assert not list(parts.glob("*.zip"))
                after = client.get(f"/v1/jobs/{job['id']}").json()
                assert not [s for s in after["shards"] if s["state"] in ("queued", "running")]
    finally:
        stack.close()


def test_workers_join_and_leave_while_a_sharded_job_runs(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    """A worker that joins picks up shards within seconds; one stopped with SIGTERM puts its
    shard back at the front of the queue and the job still completes, identical."""
    settings = _settings(redis_server, tmp_path / "data", "elastic")
    first = start_worker(settings, tiny_model, tmp_path / "first.log")
    second = None
    # 4,000 images in 100 shards: long enough on any machine for a second worker to load.
    body = {**JOB, "ipc": 200, "augment": {"policy": "none"}}
    try:
        with TestClient(create_app(settings)) as client:
            job = client.post("/v1/jobs", json=body).json()
            wait_for(client.get, job["id"], until=lambda j: j["progress"]["written"] > 0)
            second = start_worker(settings, tiny_model, tmp_path / "second.log")
            joined = wait_for(client.get, job["id"], until=_two_running_workers, timeout=60)
            assert joined["state"] == "running"

            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=60) == 0
            final = wait_for(client.get, job["id"], timeout=180)
            assert final["state"] == "succeeded", final
            interrupted = [
                s for s in final["shards"] if "shut down" in (s["last_interruption"] or "")
            ]
            ran = {s["worker"] for s in final["shards"]}
            with TestClient(
                create_app(settings.model_copy(update={"shard_images": 100_000}))
            ) as whole:
                ref = whole.post("/v1/jobs", json=body).json()
                ref = wait_for(whole.get, ref["id"], timeout=180)
        assert ref["archive"]["sha256"] == final["archive"]["sha256"]
        assert len(ran) == 2, ran
        print(f"{len(interrupted)} shard(s) interrupted by the SIGTERM and run again elsewhere")
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_worker(proc)


def _two_running_workers(job: dict[str, Any]) -> bool:
    running = {s["worker"] for s in job["shards"] if s["state"] == "running"}
    return len(running) == 2


def test_sharded_job_through_an_s3_store(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    """Shards upload parts to a real S3 server, assembly publishes the archive there, the API
    streams it back; no parts or scratch files remain."""
    settings = _settings(
        redis_server, tmp_path / "scratch", "s3-shards", **s3_server.settings_overrides("sharded")
    )
    stack = _start(settings, tiny_model, tmp_path, 2)
    try:
        with api(stack) as client, api(stack, shard_images=100_000) as whole:
            job = client.post("/v1/jobs", json=JOB).json()
            done = wait_for(client.get, job["id"], timeout=180)
            assert done["state"] == "succeeded", done
            assert len({s["worker"] for s in done["shards"]}) == 2
            data = _archive(client, done)
            ranged = client.get(
                f"/v1/jobs/{job['id']}/archive", headers={"Range": "bytes=100-1099"}
            )
            assert ranged.status_code == 206 and ranged.content == data[100:1100]

            ref = whole.post("/v1/jobs", json=JOB).json()
            ref = wait_for(whole.get, ref["id"], timeout=180)
            assert ref["archive"]["sha256"] == done["archive"]["sha256"]
        bucket = s3_server.root / s3_server.bucket / "sharded"
        stored = sorted(p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file())
        assert f"{job['id']}.zip" in stored and f"{job['id']}.preview.png" in stored
        assert not [k for k in stored if k.startswith("parts/")], stored
        assert not [p for p in settings.data_dir.rglob("*") if p.is_file()]
    finally:
        stack.close()
