"""Metrics move by the right amounts after a real job; logs are JSON with one line per state."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core import logs
from tests.conftest import ROOT, wait_for


def scrape(client: TestClient) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_a_real_job(client: TestClient, worker: subprocess.Popen[bytes]) -> None:
    before = scrape(client)
    body = {"labels": ["cat", "dog", "ship"], "ipc": 10}
    job = client.post("/v1/jobs", json=body).json()
    assert wait_for(client.get, job["id"])["state"] == "succeeded"
    after = scrape(client)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("distill_jobs_submitted_total") == 1
    assert delta('distill_jobs_finished_total{state="succeeded"}') == 1
    assert delta('distill_jobs_finished_total{state="failed"}') == 0
    assert delta("distill_images_generated_total") == 6
    assert delta("distill_images_written_total") == 30
    assert delta("distill_job_duration_seconds_count") == 1
    assert delta('distill_job_duration_seconds_bucket{le="+Inf"}') == 1
    assert delta("distill_queue_wait_seconds_count") == 1
    assert delta("distill_job_duration_seconds_sum") > 0
    assert after["distill_last_job_images_per_second"] > 0
    assert after["distill_workers_alive"] >= 1 and after["distill_workers_ready"] >= 1
    # Each worker advertises its own throughput (device-labelled), read through its heartbeat.
    deadline = time.monotonic() + 10
    while not any(k.startswith("distill_worker_images_per_second{") for k in after):
        assert time.monotonic() < deadline, "no per-worker throughput in /metrics"
        time.sleep(0.2)
        after = scrape(client)
    rates = {k: v for k, v in after.items() if k.startswith("distill_worker_images_per_second{")}
    assert all('device="cpu"' in k and v > 0 for k, v in rates.items()), rates
    assert after['distill_jobs{state="running"}'] == 0
    assert "distill_queue_depth" in after


def test_metrics_count_canceled_jobs(idle_client: TestClient) -> None:
    before = scrape(idle_client)
    job = idle_client.post("/v1/jobs", json={"labels": ["x"], "ipc": 1}).json()
    queued = scrape(idle_client)
    assert queued['distill_jobs{state="queued"}'] == before['distill_jobs{state="queued"}'] + 1
    idle_client.post(f"/v1/jobs/{job['id']}/cancel")
    after = scrape(idle_client)
    key = 'distill_jobs_finished_total{state="canceled"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["distill_queue_depth"] == before["distill_queue_depth"]


def _json_lines(text: str) -> list[dict[str, object]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def test_each_state_change_is_one_json_log_line(
    client: TestClient,
    worker: subprocess.Popen[bytes],
    worker_log: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="distill.jobs")
    job = client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 2}).json()
    wait_for(client.get, job["id"])
    queued = [r for r in caplog.records if getattr(r, "job_id", None) == job["id"]]
    assert [getattr(r, "state", None) for r in queued] == ["queued"]
    assert json.loads(logs.JsonFormatter().format(queued[0]))["state"] == "queued"

    rows = _json_lines(worker_log.read_text())
    assert rows, "the worker logs JSON lines"
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in rows)
    mine = [r for r in rows if r.get("job_id") == job["id"]]
    assert [r["state"] for r in mine] == ["running", "succeeded"]
    assert mine[1]["seconds"] > 0 and re.fullmatch(r"[0-9a-f]{64}", str(mine[1]["archive_sha256"]))


def test_errors_are_logged_with_their_cause_as_json() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info(), extra={"job_id": "j"}
        )
    row = json.loads(logs.JsonFormatter().format(record))
    assert row["job_id"] == "j"
    assert row["error"]["type"] == "RuntimeError"
    assert "KeyError" in row["error"]["cause"]


@pytest.mark.parametrize(
    ("module", "variable", "value"),
    [
        ("service", "DISTILL_PORT", "eighty"),
        ("worker", "DISTILL_BATCH_SIZE", "0"),
        ("service.launcher", "DISTILL_LOG_LEVEL", "LOUD"),
        ("worker", "DISTILL_DTYPE", "float8"),
    ],
)
def test_bad_setting_exits_at_once_naming_the_variable(
    module: str, variable: str, value: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), variable: value}
    proc = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert variable in lines[0] and "invalid configuration" in lines[0]


def test_every_response_says_how_long_the_service_spent_on_it(client: TestClient) -> None:
    """Server-Timing ``app;dur=<ms>``: on answers, problems and refusals before routing."""
    for response in (
        client.get("/healthz"),
        client.get("/v1/jobs/0123456789abcdef0123456789abcdef"),  # a 404 problem
        client.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}),  # 415
    ):
        timing = response.headers["server-timing"]
        match = re.fullmatch(r"app;dur=(\d+\.\d{3})", timing)
        assert match is not None, timing
        assert 0 < float(match[1]) < 60_000
