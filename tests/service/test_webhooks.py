"""Signed webhooks from a separate delivery worker to a real receiver on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from service import stack
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import TEST_ENV, make_settings, wait_for

SECRET = "whsec_" + base64.b64encode(b"a test secret of 24 bytes").decode()


class Receiver:
    """An HTTP receiver that fails its first ``failures`` requests, then accepts."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(receiver.received) < receiver.failures else 204
                receiver.received.append(
                    ({k.lower(): v for k, v in self.headers.items()}, body, status)
                )
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [r for r in self.received if r[2] == 204]


def verify(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """Standard Webhooks verification, written out independently of the service's signer."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert any(
        hmac.compare_digest(sig.removeprefix("v1,"), expected)
        for sig in headers["webhook-signature"].split()
    )
    assert abs(time.time() - int(headers["webhook-timestamp"])) < 300
    event: dict[str, Any] = json.loads(body)
    return event


@pytest.fixture
def hook_stack(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path, worker: subprocess.Popen[bytes]
) -> Iterator[tuple[TestClient, Settings]]:
    """The API and a webhook sender on the session's worker queue, private callbacks allowed."""
    base = make_settings(redis_server.url, tmp_path)
    settings = Settings(
        **{
            **base.model_dump(),
            "queue_name": "distill",
            "data_dir": base.data_dir,
            "webhook_secret": SECRET,
            "webhook_allow_private": True,
            "webhook_retry_seconds": 30,
        }
    )
    sender = stack.spawn("service.webhooks", settings, log=tmp_path / "webhooks.log", env=TEST_ENV)
    try:
        with TestClient(create_app(settings)) as client:
            yield client, settings
    finally:
        stack.stop(sender)


def _wait(predicate: Any, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_signed_event_arrives_once_and_verifies(hook_stack: tuple[TestClient, Settings]) -> None:
    client, _ = hook_stack
    receiver = Receiver()
    job = client.post(
        "/v1/jobs", json={"labels": ["cat"], "ipc": 2, "callback_url": receiver.url}
    ).json()
    done = wait_for(client.get, job["id"])
    _wait(lambda: receiver.accepted())
    headers, body, _ = receiver.accepted()[0]
    event = verify(headers, body)
    assert event["type"] == "job.succeeded"
    assert event["data"]["id"] == job["id"]
    assert event["data"]["archive"]["sha256"] == done["archive"]["sha256"]
    assert event["data"]["archive"]["url"].endswith(f"/v1/jobs/{job['id']}/archive")
    shown = client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
    assert shown["url"] == receiver.url and shown["attempts"][-1]["status_code"] == 204


def test_failing_receiver_gets_exactly_one_accepted_event_after_retries(
    hook_stack: tuple[TestClient, Settings],
) -> None:
    client, _ = hook_stack
    receiver = Receiver(failures=2)
    job = client.post(
        "/v1/jobs", json={"labels": ["dog"], "ipc": 1, "callback_url": receiver.url}
    ).json()
    wait_for(client.get, job["id"])
    _wait(lambda: receiver.accepted())
    time.sleep(1.5)  # no further deliveries after the accepted one
    assert [r[2] for r in receiver.received] == [500, 500, 204]
    ids = {r[0]["webhook-id"] for r in receiver.received}
    assert len(ids) == 1  # the same message, retried
    attempts = client.get(f"/v1/jobs/{job['id']}").json()["webhook"]["attempts"]
    assert [a["status_code"] for a in attempts] == [500, 500, 204]


def test_canceled_job_sends_its_event_too(hook_stack: tuple[TestClient, Settings]) -> None:
    _, settings = hook_stack
    receiver = Receiver()
    idle = Settings(**{**settings.model_dump(), "queue_name": f"idle-{uuid.uuid4().hex[:6]}"})
    with TestClient(create_app(idle)) as idle_client:
        job = idle_client.post(
            "/v1/jobs", json={"labels": ["x"], "ipc": 1, "callback_url": receiver.url}
        ).json()
        idle_client.post(f"/v1/jobs/{job['id']}/cancel")
    _wait(lambda: receiver.accepted())
    assert verify(*receiver.accepted()[0][:2])["type"] == "job.canceled"


def test_private_callback_refused_without_the_setting(idle_client: TestClient) -> None:
    # idle_client has no webhook secret: callbacks are refused outright.
    response = idle_client.post(
        "/v1/jobs", json={"labels": ["x"], "ipc": 1, "callback_url": "http://127.0.0.1:9/x"}
    )
    assert response.status_code == 422
    assert "callback_url" in response.json()["detail"]


def test_private_address_refused_when_not_allowed(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, webhook_secret=SECRET)
    with TestClient(create_app(settings)) as client:
        for url in ("http://127.0.0.1:8080/x", "http://10.1.2.3/x", "http://169.254.169.254/x"):
            response = client.post(
                "/v1/jobs", json={"labels": ["x"], "ipc": 1, "callback_url": url}
            )
            assert response.status_code == 422, url
            assert "non-public" in response.json()["detail"]
        bad = client.post("/v1/jobs", json={"labels": ["x"], "ipc": 1, "callback_url": "ftp://x"})
        assert bad.status_code == 422
    assert os.environ.get("DISTILL_WEBHOOK_ALLOW_PRIVATE") is None
