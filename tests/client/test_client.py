"""The Python client over real HTTP: the API as a subprocess, the session's real worker.

Faults are injected below the client, in an httpx transport wrapped around the real one: the
request still reaches the real server, and only the answer is lost or cut short.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from client import (
    ChecksumMismatch,
    Client,
    Conflict,
    InvalidRequest,
    Job,
    NotFound,
    ServerUnreachable,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    WebhookVerificationError,
    sign_webhook,
    verify_webhook,
)
from core.settings import Settings
from tests.conftest import API_KEY, OTHER_KEY, ROOT, live_api


class Recording(httpx.BaseTransport):
    """Real HTTP, remembering every request and its response."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.exchanges: list[tuple[httpx.Request, httpx.Response]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.exchanges.append((request, response))
        return response

    def close(self) -> None:
        self.inner.close()


class LoseFirstAnswer(Recording):
    """Delivers the first POST to the server, then reports the connection reset before its
    answer arrived: the job exists, the caller does not know it."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: httpx.Response | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and self.lost is None:
            response.read()
            response.close()
            self.lost = response
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


class _CutStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, limit: int) -> None:
        self.inner = inner
        self.limit = limit

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self.inner:
            if sent + len(chunk) >= self.limit:
                yield chunk[: self.limit - sent]
                raise httpx.ReadError("connection lost mid-download")
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class CutFirstDownload(Recording):
    """The first archive response stops after ``limit`` bytes with a read error."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.cut = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/archive") and not self.cut:
            self.cut = True
            stream = cast(httpx.SyncByteStream, response.stream)
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_CutStream(stream, self.limit),
                request=request,
            )
        return response


@pytest.fixture(scope="module")
def distill(api: str) -> Iterator[Client]:
    with Client(api, API_KEY, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def finished(distill: Client) -> tuple[Job, list[Job]]:
    """One small job, submitted with ``wait`` (Prefer: wait) and then waited for."""
    job = distill.submit(labels=["cat", "dog"], ipc=2, image_size=16, copies=1, seed=3, wait=30)
    assert job["state"] in {"queued", "running", "succeeded"}
    seen: list[Job] = []
    job = distill.wait(job, timeout=120, on_progress=seen.append, poll_interval=0.1)
    assert job["state"] == "succeeded", job
    return job, seen


def test_submit_wait_download_gives_a_verified_imagefolder_zip(
    distill: Client, finished: tuple[Job, list[Job]], tmp_path: Path
) -> None:
    job, seen = finished
    assert seen and seen[-1] == job
    assert len({json.dumps(j, sort_keys=True) for j in seen}) == len(seen)  # changes only
    assert job["request"]["labels"] == ["cat", "dog"]
    assert job["request"]["augment"]["copies"] == 1
    assert job["request"]["image_size"] == 16
    archive = job.get("archive")
    assert archive is not None

    path = distill.download(job, tmp_path / "data.zip")
    assert path == tmp_path / "data.zip"
    data = path.read_bytes()
    assert len(data) == archive["size_bytes"]
    assert hashlib.sha256(data).hexdigest() == archive["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip"]  # no .part left
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
    assert "train/metadata.jsonl" in names
    pngs = [n for n in names if n.startswith("train/") and n.endswith(".png")]
    assert len(pngs) == 4 and {n.split("/")[1] for n in pngs} == {"000_cat", "001_dog"}
    assert manifest["request"]["labels"] == ["cat", "dog"]

    # A directory as the target: the file is named after the job; a job id works as well.
    into_dir = distill.download(job["id"], tmp_path)
    assert into_dir == tmp_path / f"distill-{job['id']}.zip"
    assert into_dir.read_bytes() == data


def test_same_idempotency_key_same_job_and_other_body_is_422(distill: Client) -> None:
    key = f"test-{uuid.uuid4()}"
    first = distill.submit(labels=["ox"], ipc=1, policy="none", seed=11, idempotency_key=key)
    again = distill.submit(
        spec={"labels": ["ox"], "ipc": 1, "augment": {"policy": "none"}, "seed": 11},
        idempotency_key=key,
    )
    assert again["id"] == first["id"]
    with pytest.raises(InvalidRequest) as caught:
        distill.submit(labels=["ox"], ipc=2, policy="none", seed=11, idempotency_key=key)
    assert caught.value.status == 422
    assert "Idempotency-Key" in caught.value.detail
    _stop(distill, first)


def test_a_lost_answer_is_retried_without_making_a_second_job(api: str) -> None:
    transport = LoseFirstAnswer()
    with Client(api, API_KEY, transport=transport, backoff=0.01) as client:
        job = client.submit(labels=["yak"], ipc=1, policy="none", seed=12)
        assert transport.lost is not None and transport.lost.status_code == 202
        assert job["id"] == transport.lost.json()["id"]
        posts = [(q, r) for q, r in transport.exchanges if q.method == "POST"]
        assert len(posts) == 2
        keys = {q.headers["idempotency-key"] for q, _ in posts}
        assert len(keys) == 1 and uuid.UUID(keys.pop())
        assert posts[1][1].headers.get("idempotent-replayed") == "true"
        _stop(client, job)


def test_unknown_job_is_a_typed_404_with_the_problem_fields(
    distill: Client, tmp_path: Path
) -> None:
    with pytest.raises(NotFound) as caught:
        distill.get("no-such-job")
    error = caught.value
    assert error.status == 404
    assert error.title == "Job not found"
    assert "no-such-job" in error.detail
    assert error.instance == "/v1/jobs/no-such-job"
    assert error.type == "about:blank"
    assert str(error).startswith("404 Job not found: ")
    with pytest.raises(NotFound):
        distill.cancel("no-such-job")
    with pytest.raises(NotFound):
        distill.download("no-such-job", tmp_path / "never.zip")
    assert list(tmp_path.iterdir()) == []


def test_invalid_request_is_a_typed_422_naming_the_field(distill: Client) -> None:
    with pytest.raises(InvalidRequest) as caught:
        distill.submit(labels=["cat"], ipc=1, copies=99)
    assert caught.value.status == 422
    assert caught.value.fields == ["augment.copies"]
    assert caught.value.errors[0].message
    with pytest.raises(InvalidRequest) as caught:
        distill.submit(labels=["cat"], preset="cifar10", ipc=1)
    assert caught.value.errors


def test_api_keys_are_sent_and_checked(api: str, finished: tuple[Job, list[Job]]) -> None:
    job, _ = finished
    with Client(api) as anonymous, pytest.raises(Unauthorized) as caught:
        anonymous.get(job["id"])
    assert caught.value.status == 401
    with Client(api, OTHER_KEY) as other, pytest.raises(NotFound):
        other.get(job["id"])  # another key's job


def test_half_written_part_is_resumed_with_range(
    api: str, finished: tuple[Job, list[Job]], tmp_path: Path
) -> None:
    job, _ = finished
    archive = job.get("archive")
    assert archive is not None
    transport = Recording()
    with Client(api, API_KEY, transport=transport) as client:
        full = client.download(job, tmp_path / "ref.zip").read_bytes()
        half = len(full) // 2
        (tmp_path / "out.zip.part").write_bytes(full[:half])
        transport.exchanges.clear()
        path = client.download(job, tmp_path / "out.zip")
    assert path.read_bytes() == full
    assert not (tmp_path / "out.zip.part").exists()
    [(request, response)] = transport.exchanges  # the job was known: one request
    assert request.headers["range"] == f"bytes={half}-"
    assert request.headers["if-range"] == f'"{archive["sha256"]}"'
    assert response.status_code == 206


def test_connection_cut_mid_download_resumes_in_the_same_call(
    api: str, finished: tuple[Job, list[Job]], tmp_path: Path
) -> None:
    job, _ = finished
    archive = job.get("archive")
    assert archive is not None
    cut = archive["size_bytes"] // 3
    transport = CutFirstDownload(cut)
    with Client(api, API_KEY, transport=transport, backoff=0.01) as client:
        path = client.download(job["id"], tmp_path / "cut.zip")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == archive["sha256"]
    ranges = [q.headers.get("range") for q, _ in transport.exchanges if "archive" in q.url.path]
    assert ranges == [None, f"bytes={cut}-"]


def test_corrupt_part_fails_the_check_and_leaves_nothing_then_a_retry_works(
    distill: Client, finished: tuple[Job, list[Job]], tmp_path: Path
) -> None:
    job, _ = finished
    archive = job.get("archive")
    assert archive is not None
    target = tmp_path / "bad.zip"
    part = tmp_path / "bad.zip.part"
    part.write_bytes(b"\x00" * (archive["size_bytes"] // 2))
    with pytest.raises(ChecksumMismatch) as caught:
        distill.download(job, target)
    assert caught.value.expected == archive["sha256"]
    assert not target.exists() and not part.exists()
    # A complete-length but wrong .part needs no request and fails the same way.
    part.write_bytes(b"\x01" * archive["size_bytes"])
    with pytest.raises(ChecksumMismatch):
        distill.download(job, target)
    assert not target.exists() and not part.exists()
    distill.download(job, target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == archive["sha256"]


def test_busy_service_is_retried_honouring_retry_after_then_unavailable(
    worker: subprocess.Popen[bytes],
    stack_settings: Settings,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """A real 503 (queue full: a queue no worker drains, at most one job waiting)."""
    busy = {"queue_name": f"client-busy-{uuid.uuid4().hex[:6]}", "max_queued_jobs": 1}
    with live_api(stack_settings, tiny_model, tmp_path / "busy.log", **busy) as base:
        transport = Recording()
        with Client(base, API_KEY, retries=2, max_backoff=0.05, transport=transport) as client:
            queued = client.submit(labels=["cat"], ipc=1)
            transport.exchanges.clear()
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                client.submit(labels=["dog"], ipc=1)
            assert time.monotonic() - started >= 0.1  # two waits of Retry-After (capped)
            assert caught.value.status == 503
            assert caught.value.retry_after == 30
            assert caught.value.title == "Queue full"
            assert [r.status_code for _, r in transport.exchanges] == [503, 503, 503]
            # Nobody drains this queue: wait() gives up with the last state seen.
            with pytest.raises(WaitTimeout) as timed_out:
                client.wait(queued, timeout=0.3, poll_interval=0.1)
            assert timed_out.value.job["state"] == "queued"
            assert client.cancel(queued["id"])["state"] == "canceled"


def test_list_pages_and_iter_jobs_follow_the_cursor(distill: Client) -> None:
    # Large enough that the cancel always lands before they finish (checked between batches).
    older = distill.submit(labels=["ant"], ipc=100, policy="none", seed=21)
    newer = distill.submit(labels=["bee"], ipc=100, policy="none", seed=22)
    for job in (newer, older):
        _stop(distill, job)
    page = distill.list(state="canceled", limit=1)
    assert [j["id"] for j in page.jobs] == [newer["id"]]
    assert page.next_cursor
    second = distill.list(state="canceled", limit=1, cursor=page.next_cursor)
    assert [j["id"] for j in second.jobs] == [older["id"]]
    ids = [j["id"] for j in distill.iter_jobs("canceled", limit=2, page_size=1)]
    assert ids == [newer["id"], older["id"]]


def test_presets(distill: Client) -> None:
    presets = {p["name"]: p for p in distill.presets()}
    assert presets["cifar10"]["num_classes"] == 10
    assert distill.preset("cifar10")["classes"][0]["label"] == "airplane"
    with pytest.raises(NotFound):
        distill.preset("mnist")


def test_models_and_a_reference_set_from_upload_to_a_herding_job(distill: Client) -> None:
    (model,) = distill.models()
    assert model["default"] and model["family"] == "sdxl" and model["ready_workers"] >= 1
    from PIL import Image

    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as archive:
        for n, label in enumerate(("cat", "dog")):
            for i in range(3):
                pixels = io.BytesIO()
                Image.new("RGB", (16, 16), (40 * i, 100 * n, 7)).save(pixels, format="PNG")
                archive.writestr(f"{label}/{i}.png", pixels.getvalue())
    made = distill.upload_reference(body.getvalue(), name="pets")
    assert [c["name"] for c in made["classes"]] == ["cat", "dog"]
    assert made["id"] in [r["id"] for r in distill.references()]
    assert distill.reference(made["id"])["images"] == 6
    job = distill.submit(
        labels=["dog", "cat"], ipc=2, image_size=16, policy="none",
        method="herding", reference=made["id"],
    )  # fmt: skip
    done = distill.wait(job, timeout=120)
    assert done["state"] == "succeeded", done
    assert done["request"]["method"] == "herding"
    distill.delete_reference(made["id"])
    with pytest.raises(NotFound):
        distill.reference(made["id"])


def test_unreachable_server_is_a_typed_error_after_the_retries() -> None:
    client = Client("http://127.0.0.1:1", retries=1, backoff=0.01)
    with client, pytest.raises(ServerUnreachable) as caught:
        client.presets()
    assert isinstance(caught.value.cause, httpx.ConnectError)


def test_webhook_round_trip_and_rejections() -> None:
    body = json.dumps({"type": "job.succeeded", "data": {"id": "abc"}}).encode()
    raw_secret = "a plain shared secret"
    whsec = "whsec_" + base64.b64encode(b"sixteen byte key").decode()
    for secret in (raw_secret, whsec):
        headers = sign_webhook(body, secret)
        assert headers["webhook-signature"].startswith("v1,")
        assert verify_webhook(headers, body, secret) == {
            "type": "job.succeeded",
            "data": {"id": "abc"},
        }
        upper = {k.upper(): v for k, v in headers.items()}
        assert verify_webhook(upper, body.decode(), secret)["data"]["id"] == "abc"

    # The scheme's reference vector (standard-webhooks, the spec's own example).
    vector = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    vector_body = b'{"test": 2432232314}'
    vector_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert verify_webhook(vector, vector_body, vector_secret, now=1614265330) == {
        "test": 2432232314
    }

    headers = sign_webhook(body, raw_secret)
    rotated = {**headers, "webhook-signature": "v1,bm90IGl0 v2,zzz " + headers["webhook-signature"]}
    assert verify_webhook(rotated, body, raw_secret)["type"] == "job.succeeded"
    rejected: list[tuple[dict[str, str], bytes, str, dict[str, Any]]] = [
        (headers, body.replace(b"abc", b"abd"), raw_secret, {}),  # tampered body
        (headers, body, "another secret", {}),  # wrong secret
        (sign_webhook(body, raw_secret, timestamp=int(time.time()) - 301), body, raw_secret, {}),
        (sign_webhook(body, raw_secret, timestamp=int(time.time()) + 301), body, raw_secret, {}),
        ({k: v for k, v in headers.items() if k != "webhook-id"}, body, raw_secret, {}),
        ({**headers, "webhook-timestamp": "soon"}, body, raw_secret, {}),
        (
            {**headers, "webhook-signature": "v2," + headers["webhook-signature"][3:]},
            body,
            raw_secret,
            {},
        ),
        (headers, body, raw_secret, {"now": time.time() + 3600}),
        (sign_webhook(b"[1, 2]", raw_secret), b"[1, 2]", raw_secret, {}),  # not an object
    ]
    for bad_headers, bad_body, secret, extra in rejected:
        with pytest.raises(WebhookVerificationError):
            verify_webhook(bad_headers, bad_body, secret, **extra)


def test_importing_the_client_loads_no_torch_numpy_or_service() -> None:
    code = (
        "import sys, client, client.cli, client.api, client.webhooks\n"
        "heavy = {'torch', 'numpy', 'service', 'worker', 'fastapi', 'redis', 'diffusers'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def _stop(client: Client, job: Job) -> None:
    """Cancel a job the test no longer needs and wait until it has stopped."""
    with contextlib.suppress(Conflict):  # it may have finished already
        client.cancel(job["id"])
    client.wait(job, timeout=60, poll_interval=0.05)


def test_every_request_field_is_a_keyword_of_build_spec() -> None:
    from typing import get_type_hints

    from client.api import SpecFields, build_spec
    from core.spec import DatasetSpec

    assert set(DatasetSpec.model_fields) <= set(get_type_hints(SpecFields))
    soft = {"teacher": "reference", "temperature": 2.0, "top_k": 2}
    body = build_spec(labels=["cat", "dog"], ipc=1, reference="pets", soft_labels=soft)
    assert body == {"labels": ["cat", "dog"], "ipc": 1, "reference": "pets", "soft_labels": soft}
    assert DatasetSpec.model_validate(body).soft_labels is not None
    select = {"oversample": 2, "keep": "herding"}
    body = build_spec(labels=["cat", "dog"], ipc=1, reference="pets", select=select)
    assert body == {"labels": ["cat", "dog"], "ipc": 1, "reference": "pets", "select": select}
    assert DatasetSpec.model_validate(body).select is not None
