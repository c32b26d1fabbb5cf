"""A Redis restart (append-only file on) loses no accepted job; the API says 503 meanwhile."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis, free_port
from tests.conftest import make_settings, start_worker, stop_worker, wait_for


def test_restarting_redis_loses_no_job_and_workers_reconnect(
    tiny_model: Path, tmp_path: Path
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persist=True).start()
    # Heartbeat TTL longer than the outage, so the running job is not taken for lost.
    settings = make_settings(server.url, tmp_path / "data", heartbeat_ttl=30)
    worker = start_worker(settings, tiny_model, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            done = client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 2}).json()
            done = wait_for(client.get, done["id"])
            assert done["state"] == "succeeded"

            body = {
                "labels": [f"c{i}" for i in range(100)],
                "ipc": 20,
                "augment": {"policy": "none"},
            }
            running = client.post("/v1/jobs", json=body).json()
            queued = [
                client.post("/v1/jobs", json={"labels": [f"q{i}"], "ipc": 3}).json()
                for i in range(2)
            ]
            wait_for(client.get, running["id"], until=lambda j: j["progress"]["written"] > 0)

            server.stop()
            during = client.get(f"/v1/jobs/{done['id']}")
            assert during.status_code == 503
            assert during.headers["retry-after"]
            assert during.headers["content-type"] == "application/problem+json"
            assert "Traceback" not in during.text
            refused = client.post("/v1/jobs", json={"labels": ["x"], "ipc": 1})
            assert refused.status_code == 503
            assert client.get("/readyz").status_code == 503
            time.sleep(1.0)
            server.start()

            for job in (running, *queued):
                final = wait_for(client.get, job["id"], timeout=180)
                assert final["state"] == "succeeded", final
            archive = client.get(f"/v1/jobs/{done['id']}/archive")
            assert archive.status_code == 200
            assert hashlib.sha256(archive.content).hexdigest() == done["archive"]["sha256"]
            # The same worker process took new work after the restart.
            after = client.post("/v1/jobs", json={"labels": ["dog"], "ipc": 1}).json()
            assert wait_for(client.get, after["id"])["worker"] == done["worker"]
            assert worker.poll() is None
    finally:
        stop_worker(worker)
        server.stop()
