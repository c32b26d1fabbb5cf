"""Workers that die or are stopped never lose a job or leave it running."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, partial_path, start_worker, stop_worker, wait_for

LONG_JOB = {"labels": [f"c{i}" for i in range(100)], "ipc": 100, "augment": {"policy": "none"}}


def _running(client: TestClient, job_id: str) -> dict[str, Any]:
    return wait_for(client.get, job_id, until=lambda j: j["progress"]["written"] > 0)


def test_sigkilled_worker_fails_its_job_when_no_attempts_are_left(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url, tmp_path / "data", queue_name="death", heartbeat_ttl=3, max_attempts=1
    )
    proc = start_worker(settings, tiny_model, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            job = client.post("/v1/jobs", json=LONG_JOB).json()
            running = _running(client, job["id"])
            partial = partial_path(settings.data_dir, job["id"])
            assert partial.exists()

            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic()
            final = wait_for(client.get, job["id"], timeout=30)
            waited = time.monotonic() - killed_at

            assert final["state"] == "failed"
            assert final["error"]["type"] == "worker_lost"
            assert running["worker"] in final["error"]["detail"]
            assert "no attempts left" in final["error"]["detail"]
            assert final["attempts"] == 1 and final["finished_at"] is not None
            assert not partial.exists()
            assert client.get(f"/v1/jobs/{job['id']}/archive").status_code == 409
            print(f"job failed {waited:.1f} s after the worker was killed (heartbeat TTL 3 s)")

            # The dead worker's status expires too, so readiness stops counting it.
            time.sleep(settings.heartbeat_ttl + 0.5)
            ready = client.get("/readyz").json()
            assert all(w["name"] != final["worker"] for w in ready["workers"])
    finally:
        stop_worker(proc)


def test_job_of_a_killed_worker_is_retried_by_another_worker(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url, tmp_path / "data", queue_name="retry", heartbeat_ttl=3, max_attempts=2
    )
    workers = [start_worker(settings, tiny_model, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        with TestClient(create_app(settings)) as client:
            body = {**LONG_JOB, "ipc": 20}
            job = client.post("/v1/jobs", json=body).json()
            first = _running(client, job["id"])
            victim = next(w for w in workers if f".{w.pid}." in first["worker"])
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()

            final = wait_for(client.get, job["id"], timeout=120)
            assert final["state"] == "succeeded", final
            assert final["attempts"] == 2
            assert final["worker"] != first["worker"]
            assert first["worker"] in final["last_interruption"]
            assert final["progress"]["written"] == 100 * 20
            assert not partial_path(settings.data_dir, job["id"]).exists()
            archive = client.get(f"/v1/jobs/{job['id']}/archive")
            assert archive.status_code == 200
    finally:
        for proc in workers:
            stop_worker(proc)


def test_sigterm_finishes_the_batch_requeues_at_the_front_and_exits_cleanly(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path / "data", queue_name="term")
    first_worker = start_worker(settings, tiny_model, tmp_path / "worker1.log")
    second_worker = None
    try:
        with TestClient(create_app(settings)) as client:
            interrupted = client.post("/v1/jobs", json={**LONG_JOB, "ipc": 10}).json()
            _running(client, interrupted["id"])
            behind = client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 1}).json()

            first_worker.send_signal(signal.SIGTERM)
            assert first_worker.wait(timeout=30) == 0

            back = client.get(f"/v1/jobs/{interrupted['id']}").json()
            assert back["state"] == "queued"
            assert back["queue_position"] == 0
            assert "shut down" in back["last_interruption"]
            assert back["progress"]["written"] == 0
            assert client.get(f"/v1/jobs/{behind['id']}").json()["queue_position"] == 1
            assert not partial_path(settings.data_dir, interrupted["id"]).exists()

            second_worker = start_worker(settings, tiny_model, tmp_path / "worker2.log")
            done = wait_for(client.get, interrupted["id"], timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 2
            later = wait_for(client.get, behind["id"])
            assert later["started_at"] > done["started_at"]
    finally:
        stop_worker(first_worker)
        if second_worker is not None:
            stop_worker(second_worker)


def test_sigterm_lets_an_idle_worker_exit_cleanly(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path / "data", queue_name="idle-term")
    proc = start_worker(settings, tiny_model, tmp_path / "worker.log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
    assert all(str(proc.pid) not in w["name"] for w in ready["workers"])


class _SignalInsideEmit(logging.StreamHandler):  # type: ignore[type-arg]
    """A log handler that receives SIGTERM while it formats RQ's "dequeueing" line: the
    ``StopRequested`` raised by the signal handler lands in ``emit``'s own ``except``."""

    fired = False

    def format(self, record: logging.LogRecord) -> str:
        if not self.fired and "dequeueing" in record.getMessage():
            self.fired = True
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here, inside this call
        return super().format(record)


def test_a_stop_swallowed_by_a_log_handler_still_stops_an_idle_worker(
    redis_server: EmbeddedRedis,
) -> None:
    """A SIGTERM whose ``StopRequested`` is caught by code the signal interrupted (a log
    handler here) must still end the worker's wait on the queue within seconds."""
    from worker.main import STOP_POLL_SECONDS, DistillWorker

    redis = Redis.from_url(redis_server.url)
    worker = DistillWorker(
        [Queue(f"swallowed-{uuid.uuid4().hex[:6]}", connection=redis)],
        connection=redis,
        name=f"swallowed-{uuid.uuid4().hex[:6]}",
    )
    handler = _SignalInsideEmit()
    rq_log = logging.getLogger("rq.worker")
    rq_log.addHandler(handler)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    try:
        worker.work(with_scheduler=False, logging_level="DEBUG")
    finally:
        rq_log.removeHandler(handler)
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        redis.close()
    assert handler.fired
    assert time.monotonic() - started < STOP_POLL_SECONDS + 10
    assert worker.get_state() != "busy"


def test_a_worker_stops_listening_for_commands_within_seconds(
    redis_server: EmbeddedRedis,
) -> None:
    """RQ's command listener waits a minute between looks at its stop flag, and redis-py
    joins it without a limit: unsubscribing (every shutdown does) must not wait that out."""
    from worker.main import PUBSUB_POLL_SECONDS, DistillWorker

    redis = Redis.from_url(redis_server.url)
    worker = DistillWorker(
        [Queue("listener", connection=redis)],
        connection=redis,
        name=f"listener-{uuid.uuid4().hex[:6]}",
    )
    try:
        worker.subscribe()
        time.sleep(0.5)
        # As on a loaded machine, the listener reads the unsubscribe reply before it is told
        # to stop: it then waits for a subscription again, a poll's length.
        worker.pubsub.unsubscribe()
        time.sleep(0.5)
        started = time.monotonic()
        worker.unsubscribe()
        assert time.monotonic() - started < PUBSUB_POLL_SECONDS + 5
        assert worker.pubsub_thread is not None and not worker.pubsub_thread.is_alive()
    finally:
        redis.close()


def test_a_beat_before_rq_registers_the_worker_writes_nothing(redis_server: EmbeddedRedis) -> None:
    """The status thread may beat between "model loaded" and RQ's birth registration; a beat
    then would create the worker's key, and RQ would refuse to start it as a duplicate."""
    from redis import Redis
    from rq import Queue

    from worker.main import DistillWorker

    connection = Redis.from_url(redis_server.url)
    worker = DistillWorker([Queue("early-beat", connection=connection)], connection=connection)
    worker.beat_running_jobs()
    assert not connection.exists(worker.key)
    worker.register_birth()
    try:
        worker.beat_running_jobs()
        assert connection.hget(worker.key, "last_heartbeat") is not None
    finally:
        worker.register_death()
        connection.delete(worker.key)
        connection.close()


def _nice(pid: int, tid: int | None = None) -> int:
    """A thread's niceness from /proc (field 19 of its stat line)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


def test_a_worker_runs_nicer_than_the_api_with_all_its_threads_and_processes(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    """DISTILL_WORKER_NICE: on a shared host the API and Redis answer first."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    settings = make_settings(
        redis_server.url,
        tmp_path / "data",
        queue_name="nice-worker",
        worker_nice=7,
        postprocess_mode="processes",
        postprocess_workers=2,
    )
    proc = start_worker(settings, tiny_model, tmp_path / "worker.log")
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(threads) > 1
        assert {_nice(proc.pid, t) for t in threads} == {7}
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children and {_nice(int(c)) for c in children} == {7}
        assert _nice(os.getpid()) < 7
    finally:
        stop_worker(proc)
