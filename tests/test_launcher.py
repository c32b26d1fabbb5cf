"""The newcomer's path: `make run` (the launcher) serves a job from POST to download over HTTP."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.redis_server import free_port
from tests.conftest import ROOT, TERMINAL


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"launcher exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"stack never became ready:\n{log.read_text()}")


def _launch(
    tiny_model: Path, tmp_path: Path, *, tiny_decoder: bool = True, **extra: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`python -m service.launcher` on the tiny model, as `make run` starts it, on a free
    port; returns it, its base URL and its log. ``tiny_decoder``: set DISTILL_TINY_DECODER to
    the tiny decoder built beside the model (False: leave it unset, at its default)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    if tiny_decoder:
        env["DISTILL_TINY_DECODER"] = str(tiny_model / "tiny_decoder")
    env.update(
        {
            "DISTILL_MODEL": str(tiny_model),
            "DISTILL_PORT": str(port),
            "DISTILL_DATA_DIR": str(tmp_path / "data"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            **extra,
        }
    )
    log = tmp_path / "launcher.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.launcher"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    return proc, f"http://127.0.0.1:{port}", log


def test_launcher_runs_redis_worker_and_api_and_stops_them_together(
    tiny_model: Path, tmp_path: Path
) -> None:
    proc, base, log = _launch(tiny_model, tmp_path, DISTILL_WORKERS="2")
    try:
        _wait_ready(base, proc, log)
        deadline = time.monotonic() + 60
        while len(httpx.get(f"{base}/readyz", timeout=5).json()["workers"]) < 2:
            assert time.monotonic() < deadline, "the second worker never became ready"
            time.sleep(0.2)
        body = {"labels": ["cat", "dog", "ship"], "ipc": 10, "image_size": 32, "seed": 0}
        started = time.perf_counter()
        created = httpx.post(f"{base}/v1/jobs", json=body, timeout=10)
        assert created.status_code == 202
        location = created.headers["location"]
        while (job := httpx.get(base + location, timeout=10).json())["state"] not in TERMINAL:
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
        archive = httpx.get(job["archive"]["url"], timeout=30)
        elapsed = time.perf_counter() - started
        assert archive.status_code == 200
        assert hashlib.sha256(archive.content).hexdigest() == job["archive"]["sha256"]
        assert archive.headers["etag"] == f'"{job["archive"]["sha256"]}"'
        print(f"3 classes x ipc 10 on the tiny model: POST to downloaded archive {elapsed:.2f} s")
        assert (tmp_path / "data" / f"{job['id']}.zip").is_file()
        assert (tmp_path / "data" / "redis" / "redis.log").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)
    # The embedded Redis it announced is gone too.
    announced = re.search(r"embedded Redis on (redis://\S+)", log.read_text())
    assert announced, log.read_text()
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(announced.group(1), socket_connect_timeout=1).ping()


def test_a_killed_worker_is_restarted_and_its_job_succeeds_on_a_second_attempt(
    tiny_model: Path, tmp_path: Path
) -> None:
    """SIGKILL (an out-of-memory kill, say) the worker mid-job under `make run`'s launcher:
    the API answers throughout, a new worker comes up, the job runs again and succeeds."""
    proc, base, log = _launch(
        tiny_model, tmp_path, DISTILL_HEARTBEAT_INTERVAL="0.5", DISTILL_HEARTBEAT_TTL="3"
    )
    try:
        _wait_ready(base, proc, log)
        body = {
            "labels": [f"class {i}" for i in range(20)],
            "ipc": 40,
            "augment": {"policy": "none"},
        }
        job_id = httpx.post(f"{base}/v1/jobs", json=body, timeout=10).json()["id"]
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{base}/v1/jobs/{job_id}", timeout=5).json())["progress"][
            "written"
        ] == 0:
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        first = job["worker"]
        os.kill(int(first.split(".")[-2]), signal.SIGKILL)
        answered = 0
        # A guard against a hang, not a speed test: a loaded machine runs both attempts slowly.
        deadline = time.monotonic() + 300
        while (job := httpx.get(f"{base}/v1/jobs/{job_id}", timeout=5).json())[
            "state"
        ] not in TERMINAL:
            answered += 1  # every read answers: the API is up while the worker is gone
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 2 and job["worker"] != first
        assert "lost on attempt 1" in (job["last_interruption"] or "")
        assert answered > 0
        text = log.read_text()
        assert "worker-1 exited with status -9; restarting it in 1 s" in text, text
        assert "worker-1 restarted" in text
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()


def test_launcher_starts_a_worker_for_each_model_of_distill_models(
    tiny_model: Path, tiny_dit: Path, tmp_path: Path
) -> None:
    proc, base, log = _launch(
        tiny_model,
        tmp_path,
        DISTILL_MODELS=f"turbo={tiny_model},dit={tiny_dit}",
        DISTILL_MODEL="",  # each worker is given its alias
    )
    try:
        _wait_ready(base, proc, log)
        deadline = time.monotonic() + 90
        while httpx.get(f"{base}/readyz", timeout=5).json()["models"] != {"turbo": 1, "dit": 1}:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        body = {"preset": "imagenette", "model": "dit", "ipc": 1, "image_size": 16, "steps": 1}
        created = httpx.post(f"{base}/v1/jobs", json={**body, "augment": {"policy": "none"}})
        assert created.status_code == 202, created.text
        location = created.headers["location"]
        while (job := httpx.get(base + location, timeout=10).json())["state"] not in TERMINAL:
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
        ready = httpx.get(f"{base}/readyz", timeout=5).json()
        assert {w["name"]: w["alias"] for w in ready["workers"]}[job["worker"]] == "dit"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()


def test_a_local_model_offline_serves_jobs_without_the_tiny_decoder(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`DISTILL_MODEL=<local copy> HF_HUB_OFFLINE=1 make run` with no tiny decoder beside the
    model: the default taesdxl id cannot be fetched, the worker says so in one line and
    serves jobs; decoder "tiny" is a 422 naming the field, and /readyz and /v1/models say
    why."""
    local = tmp_path / "local-model"
    shutil.copytree(tiny_model, local, ignore=shutil.ignore_patterns("tiny_decoder"))
    proc, base, log = _launch(local, tmp_path, tiny_decoder=False)
    try:
        _wait_ready(base, proc, log)
        worker = httpx.get(f"{base}/readyz", timeout=5).json()["workers"][0]
        assert worker["decoders"] == ["vae"]
        assert "madebyollin/taesdxl" in worker["unavailable"]["tiny_decoder"]
        (model,) = httpx.get(f"{base}/v1/models", timeout=5).json()["models"]
        assert model["decoders"] == ["vae"] and "tiny_decoder" in model["unavailable"]
        body = {"labels": ["cat", "dog"], "ipc": 2, "image_size": 16, "augment": {"policy": "none"}}
        refused = httpx.post(f"{base}/v1/jobs", json={**body, "decoder": "tiny"}, timeout=10)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert [e["field"] for e in refused.json()["errors"]] == ["decoder"]
        assert "madebyollin/taesdxl" in refused.json()["detail"]
        created = httpx.post(f"{base}/v1/jobs", json=body, timeout=10)
        assert created.status_code == 202, created.text
        location = created.headers["location"]
        while (job := httpx.get(base + location, timeout=10).json())["state"] not in TERMINAL:
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
        said = [line for line in log.read_text().splitlines() if "tiny decoder" in line]
        assert len(said) == 1 and "To enable it" in said[0], said
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()
