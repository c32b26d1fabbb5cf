"""The whole service with archives in an S3 bucket (a real rclone S3 server): a worker stores
the archive there, the API streams it (Range, ETag) or redirects to a presigned URL."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from core.storage import S3Storage, open_storage
from service.app import create_app
from service.redis_server import EmbeddedRedis, free_port
from tests.conftest import (
    TERMINAL,
    S3Server,
    make_settings,
    start_worker,
    stop_worker,
    unpack_testset,
    wait_for,
)

BODY = {"labels": ["cat", "dog"], "ipc": 5, "image_size": 32}


def _settled(job: dict[str, Any]) -> bool:
    # records.finish sets the outcome before the archive fields: wait for both.
    return job["state"] in TERMINAL and (job["state"] != "succeeded" or bool(job["archive"]))


@dataclass
class S3Stack:
    settings: Settings
    client: TestClient
    job: dict[str, Any]
    worker: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def s3_stack(
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    s3_server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[S3Stack]:
    tag = uuid.uuid4().hex[:8]
    testsets = tmp_path_factory.mktemp("testsets")
    settings = make_settings(
        redis_server.url,
        tmp_path_factory.mktemp("scratch"),
        queue_name=f"s3-{tag}",
        testsets_dir=testsets,
        **s3_server.settings_overrides(f"archives-{tag}"),
    )
    log = tmp_path_factory.mktemp("logs") / "s3-worker.log"
    worker = start_worker(settings, tiny_model, log)
    try:
        with TestClient(create_app(settings)) as client:
            created = client.post("/v1/jobs", json=BODY)
            assert created.status_code == 202, created.text
            job = wait_for(client.get, created.json()["id"], until=_settled)
            assert job["state"] == "succeeded", (job, log.read_text()[-3000:])
            yield S3Stack(settings, client, job, worker)
    finally:
        stop_worker(worker)


def test_the_archive_lives_in_the_bucket_and_not_in_scratch(s3_stack: S3Stack) -> None:
    store = open_storage(s3_stack.settings)
    assert isinstance(store, S3Storage)
    job_id = s3_stack.job["id"]
    keys = {o.key for o in store.list(job_id)}
    assert {f"{job_id}.zip", f"{job_id}.preview.png"} <= keys
    assert store.size(f"{job_id}.zip") == s3_stack.job["archive"]["size_bytes"]
    assert not list(store.list(f"parts/{job_id}/"))
    leftovers = [p for p in Path(s3_stack.settings.data_dir).rglob("*") if job_id in p.name]
    assert leftovers == []


def test_download_streams_with_etag_and_ranges(s3_stack: S3Stack) -> None:
    client, job = s3_stack.client, s3_stack.job
    url = f"/v1/jobs/{job['id']}/archive"
    whole = client.get(url)
    assert whole.status_code == 200
    data = whole.content
    assert hashlib.sha256(data).hexdigest() == job["archive"]["sha256"]
    assert len(data) == job["archive"]["size_bytes"]
    etag = f'"{job["archive"]["sha256"]}"'
    assert whole.headers["etag"] == etag
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"] == "application/zip"
    assert whole.headers["content-length"] == str(len(data))
    assert whole.headers["content-disposition"] == f'attachment; filename="distill-{job["id"]}.zip"'
    zipfile.ZipFile(io.BytesIO(data)).testzip()

    size = len(data)
    for header, (start, end) in {
        "bytes=0-99": (0, 99),
        "bytes=100-": (100, size - 1),
        "bytes=-50": (size - 50, size - 1),
        f"bytes=10-{size + 999}": (10, size - 1),
    }.items():
        part = client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[start : end + 1], header
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert part.headers["content-length"] == str(end - start + 1)
        assert part.headers["etag"] == etag

    beyond = client.get(url, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"

    resumed = client.get(url, headers={"Range": "bytes=5-9", "If-Range": etag})
    assert resumed.status_code == 206 and resumed.content == data[5:10]
    changed = client.get(url, headers={"Range": "bytes=5-9", "If-Range": '"other"'})
    assert changed.status_code == 200 and changed.content == data

    cached = client.get(url, headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.headers["etag"] == etag and cached.content == b""


def test_presigned_redirect_gives_the_same_bytes(s3_stack: S3Stack) -> None:
    job = s3_stack.job
    settings = s3_stack.settings.model_copy(update={"presign": True, "presign_seconds": 300})
    with TestClient(create_app(settings)) as client:
        response = client.get(f"/v1/jobs/{job['id']}/archive", follow_redirects=False)
        assert response.status_code == 307, response.text
        assert response.headers["etag"] == f'"{job["archive"]["sha256"]}"'
        assert "no-store" in response.headers["cache-control"]
        direct = httpx.get(response.headers["location"])
        assert direct.status_code == 200
        assert hashlib.sha256(direct.content).hexdigest() == job["archive"]["sha256"]
        assert f"distill-{job['id']}.zip" in direct.headers["content-disposition"]
        # A client that already has this version is not sent anywhere.
        cached = client.get(
            f"/v1/jobs/{job['id']}/archive",
            headers={"If-None-Match": f'"{job["archive"]["sha256"]}"'},
            follow_redirects=False,
        )
        assert cached.status_code == 304


def test_preview_and_job_page_read_from_the_bucket(s3_stack: S3Stack) -> None:
    client, job = s3_stack.client, s3_stack.job
    preview = client.get(f"/v1/jobs/{job['id']}/preview.png")
    assert preview.status_code == 200
    assert preview.headers["content-type"] == "image/png"
    assert preview.content.startswith(b"\x89PNG")
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/archive").content))
    assert preview.content == archive.read("preview.png")
    page = client.get(f"/jobs/{job['id']}").text
    assert "<h2>Manifest</h2>" in page and job["archive"]["sha256"] in page


def test_a_removed_archive_is_gone(s3_stack: S3Stack) -> None:
    client = s3_stack.client
    created = client.post("/v1/jobs", json={**BODY, "seed": 7})
    job = wait_for(client.get, created.json()["id"], until=_settled)
    assert job["state"] == "succeeded"
    open_storage(s3_stack.settings).delete(f"{job['id']}.zip")
    gone = client.get(f"/v1/jobs/{job['id']}/archive")
    assert gone.status_code == 410
    assert gone.headers["content-type"] == "application/problem+json"


def test_evaluation_reads_the_archive_and_stores_the_manifest_copy(s3_stack: S3Stack) -> None:
    client, job = s3_stack.client, s3_stack.job
    testsets = s3_stack.settings.testsets_dir
    assert testsets is not None
    data = client.get(f"/v1/jobs/{job['id']}/archive").content
    unpack_testset(data, testsets / "tiny")
    created = client.post(
        f"/v1/jobs/{job['id']}/evaluations",
        json={"testset": "tiny", "profile": "fast", "epochs": 2, "runs": 1},
    )
    assert created.status_code == 202, created.text
    url = created.headers["location"]
    evaluation = created.json()
    deadline = time.monotonic() + 120
    while evaluation["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        evaluation = client.get(url).json()
    assert evaluation["state"] == "succeeded", evaluation
    copy = json.loads(open_storage(s3_stack.settings).get_bytes(f"{job['id']}.manifest.json"))
    assert copy["evaluations"][0]["id"] == evaluation["id"]
    # The downloaded copy is gone once the evaluation is done.
    assert not list(Path(s3_stack.settings.data_dir).glob(".download-*"))


def test_an_unreachable_store_is_a_503(s3_stack: S3Stack) -> None:
    port = free_port()  # nothing listens there
    settings = s3_stack.settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{port}"})
    with TestClient(create_app(settings)) as client:
        response = client.get(f"/v1/jobs/{s3_stack.job['id']}/archive")
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["storage"].startswith("unreachable: ")
    assert "DISTILL_STORAGE" in ready.json()["detail"]
    with TestClient(create_app(s3_stack.settings)) as client:
        assert client.get("/readyz").json()["storage"] == "ok"
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "DISTILL_S3_ENDPOINT_URL" in response.json()["detail"]
