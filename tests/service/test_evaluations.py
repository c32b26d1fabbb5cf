"""Evaluations through the API: a finished job's archive measured on a named test set."""

from __future__ import annotations

import io
import json
import time
import uuid
import zipfile
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, start_worker, stop_worker, unpack_testset, wait_for


def test_evaluation_flow_on_a_tiny_archive(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    testsets = tmp_path / "testsets"
    settings = make_settings(
        redis_server.url,
        tmp_path / "data",
        queue_name=f"eval-{uuid.uuid4().hex[:6]}",
        testsets_dir=testsets,
    )
    worker = start_worker(settings, tiny_model, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            body = {"labels": ["cat", "dog"], "ipc": 10, "image_size": 16}
            job = client.post("/v1/jobs", json=body).json()
            job = wait_for(client.get, job["id"])
            data = client.get(f"/v1/jobs/{job['id']}/archive").content

            # A test set in ImageFolder form with the same class names (here: the same images).
            unpack_testset(data, testsets / "tiny")

            missing = client.post(f"/v1/jobs/{job['id']}/evaluations", json={"testset": "nothere"})
            assert missing.status_code == 422 and "tiny" in missing.json()["detail"]
            traversal = client.post(f"/v1/jobs/{job['id']}/evaluations", json={"testset": "../etc"})
            assert traversal.status_code == 422

            created = client.post(
                f"/v1/jobs/{job['id']}/evaluations",
                json={"testset": "tiny", "profile": "fast", "epochs": 3, "runs": 2},
            )
            assert created.status_code == 202, created.text
            evaluation = created.json()
            url = created.headers["location"]
            deadline_polls = 600
            while evaluation["state"] not in ("succeeded", "failed") and deadline_polls:
                evaluation = client.get(url).json()
                deadline_polls -= 1
                time.sleep(0.2)
            assert evaluation["state"] == "succeeded", evaluation
            result = evaluation["result"]
            assert len(result["accuracies"]) == 2
            assert 0.0 <= result["mean"] <= 1.0 and result["std"] >= 0.0
            assert result["protocol"]["epochs"] == 3
            assert result["testset"] == "tiny"
            listed = client.get(f"/v1/jobs/{job['id']}/evaluations").json()["evaluations"]
            assert [e["id"] for e in listed] == [evaluation["id"]]
            copy = json.loads((settings.data_dir / f"{job['id']}.manifest.json").read_text())
            assert copy["evaluations"][0]["id"] == evaluation["id"]
            assert (
                copy["request"]
                == json.loads(zipfile.ZipFile(io.BytesIO(data)).read("manifest.json"))["request"]
            )
    finally:
        stop_worker(worker)


def test_evaluation_needs_a_finished_job(idle_client: TestClient) -> None:
    job = idle_client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 1}).json()
    response = idle_client.post(f"/v1/jobs/{job['id']}/evaluations", json={"testset": "x"})
    assert response.status_code == 409
    assert idle_client.get(f"/v1/jobs/{job['id']}/evaluations/{'0' * 32}").status_code == 404
