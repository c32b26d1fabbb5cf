"""A worker that dies mid-job never leaves its job running."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, start_worker, stop_worker, wait_for
from worker import records


def test_sigkilled_worker_fails_its_job_with_a_reason_and_no_files(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url, tmp_path / "data", queue_name="death", heartbeat_ttl=3
    )
    proc = start_worker(settings, tiny_model, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            body = {
                "labels": [f"c{i}" for i in range(100)],
                "ipc": 100,
                "augment": {"policy": "none"},
            }
            job = client.post("/v1/jobs", json=body).json()
            wait_for(client.get, job["id"], until=lambda j: j["progress"]["written"] > 0)
            partial = records.partial_path(settings.data_dir, job["id"])
            assert partial.exists()

            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic()
            final = wait_for(client.get, job["id"], timeout=30)
            waited = time.monotonic() - killed_at

            assert final["state"] == "failed"
            assert final["error"]["type"] == "worker_lost"
            assert "heartbeat" in final["error"]["detail"]
            assert final["finished_at"] is not None
            assert not partial.exists()
            assert client.get(f"/v1/jobs/{job['id']}/archive").status_code == 409
            print(f"job failed {waited:.1f} s after the worker was killed (heartbeat TTL 3 s)")

            # The dead worker's status expires too, so readiness stops counting it.
            time.sleep(settings.heartbeat_ttl + 0.5)
            ready = client.get("/readyz").json()
            assert all(w["name"] != final["worker"] for w in ready["workers"])
    finally:
        stop_worker(proc)


def test_sigterm_lets_the_worker_exit_cleanly_when_idle(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path / "data", queue_name="term")
    proc = start_worker(settings, tiny_model, tmp_path / "worker.log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
    assert all(str(proc.pid) not in w["name"] for w in ready["workers"])
