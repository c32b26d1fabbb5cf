"""The operator page: server-rendered, escaped, paginated, keyed; and in a real browser."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import ROOT, live_api, make_settings, wait_for

HOSTILE = "<script>alert(1)</script>"


def test_dashboard_lists_workers_and_jobs_with_labels_escaped(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    job = client.post("/v1/jobs", json={"labels": [HOSTILE, "dog"], "ipc": 2}).json()
    wait_for(client.get, job["id"])
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert job["id"][:12] in text and f"/v1/jobs/{job['id']}/preview.png" in text
    assert "ready" in text and "http" not in text.split("<style>")[1].split("</style>")[0]

    detail = client.get(f"/jobs/{job['id']}").text
    assert "&lt;script&gt;" in detail and "<script" not in detail.lower()
    assert f'src="/v1/jobs/{job["id"]}/preview.png"' in detail
    assert "generated" in detail and "augmented" in detail


def test_page_paginates_and_reports_size_and_time(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    key = uuid.uuid4().hex
    settings = make_settings(
        redis_server.url, tmp_path, queue_name=f"ui-{key[:6]}", api_keys=key, max_queued_jobs=5000
    )
    with TestClient(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {key}"}
        for i in range(1000):
            client.post("/v1/jobs", json={"labels": [f"c{i}"], "ipc": 1}, headers=headers)
        client.cookies.set("distill_key", key)
        started = time.perf_counter()
        page = client.get("/")
        elapsed = time.perf_counter() - started
        assert page.status_code == 200
        assert page.text.count('<tr><td><a href="/jobs/') == 50
        assert "older jobs" in page.text
        print(
            f"operator page with 1,000 jobs: {len(page.content)} bytes, rendered in {elapsed:.3f} s"
        )


def test_page_asks_for_a_key_when_keys_are_on(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    settings = make_settings(redis_server.url, tmp_path, api_keys="ui-key-123456")
    with TestClient(create_app(settings)) as client:
        assert "name=key" in client.get("/").text
        wrong = client.post(
            "/ui/key",
            content="key=nope",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert "not valid" in wrong.text
        right = client.post(
            "/ui/key",
            content="key=ui-key-123456",
            headers={"content-type": "application/x-www-form-urlencoded"},
            follow_redirects=False,
        )
        assert right.status_code == 303
        assert "httponly" in right.headers["set-cookie"].lower()
        assert "Recent jobs" in client.get("/").text
        # The JSON API never takes the page's cookie.
        assert client.get("/v1/jobs").status_code == 401


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed")
def test_operator_page_in_headless_chromium(
    stack_settings: Settings,
    tiny_model: Path,
    worker: subprocess.Popen[bytes],
    client: TestClient,
    tmp_path: Path,
) -> None:
    job = client.post(
        "/v1/jobs", json={"labels": [HOSTILE, "cat", "ship"], "ipc": 5, "image_size": 16}
    ).json()
    wait_for(client.get, job["id"])
    browser = _chromium()
    assert browser is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
    ]
    with live_api(stack_settings, tiny_model, tmp_path / "api.log", api_keys=None) as base:
        dom = subprocess.run(
            [browser, *flags, "--dump-dom", f"{base}/"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert job["id"][:12] in dom
        assert "succeeded" in dom and f"/v1/jobs/{job['id']}/preview.png" in dom
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
        assert "<script>alert" not in dom
        shot = ROOT / "docs" / "operator-page.png"
        subprocess.run(
            [browser, *flags, "--window-size=1280,800", f"--screenshot={shot}", f"{base}/"],
            capture_output=True,
            timeout=120,
            check=True,
        )
        assert shot.stat().st_size > 10_000
        detail = subprocess.run(
            [browser, *flags, "--dump-dom", f"{base}/jobs/{job['id']}"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert "Preview" in detail and "<script>alert" not in detail
