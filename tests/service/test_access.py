"""API keys, idempotent submits, paginated listing and retention, against real processes."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, start_worker, stop_worker, wait_for

ALICE, BOB = "alice-key-" + "a" * 20, "bob-key-" + "b" * 20
BODY = {"labels": ["cat"], "ipc": 1}


@pytest.fixture
def keyed(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(
        redis_server.url,
        tmp_path,
        queue_name=f"keys-{uuid.uuid4().hex[:6]}",
        api_keys=f"{ALICE}, {BOB}",
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_everywhere_but_health(keyed: TestClient) -> None:
    for method, path in (
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/" + "a" * 32),
        ("GET", "/v1/presets"),
        ("GET", "/metrics"),
    ):
        response = keyed.request(method, path, json=BODY if method == "POST" else None)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/problem+json"
    wrong = keyed.get("/v1/jobs", headers=_auth("not-a-key"))
    assert wrong.status_code == 401
    assert keyed.get("/v1/jobs", headers={"Authorization": f"Basic {ALICE}"}).status_code == 401
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code in (200, 503)
    assert keyed.get("/v1/presets", headers=_auth(ALICE)).status_code == 200


def test_a_key_sees_only_its_own_jobs(keyed: TestClient) -> None:
    job = keyed.post("/v1/jobs", json=BODY, headers=_auth(ALICE)).json()
    assert keyed.get(f"/v1/jobs/{job['id']}", headers=_auth(ALICE)).status_code == 200
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/archive"):
        assert keyed.get(path, headers=_auth(BOB)).status_code == 404
    assert keyed.post(f"/v1/jobs/{job['id']}/cancel", headers=_auth(BOB)).status_code == 404
    bobs = keyed.get("/v1/jobs", headers=_auth(BOB)).json()["jobs"]
    assert job["id"] not in [j["id"] for j in bobs]
    alices = keyed.get("/v1/jobs", headers=_auth(ALICE)).json()["jobs"]
    assert job["id"] in [j["id"] for j in alices]


def test_keys_never_reach_redis_or_logs(
    keyed: TestClient, redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    keyed.post("/v1/jobs", json=BODY, headers=_auth(ALICE))
    keyed.get("/v1/jobs", headers=_auth("wrong-" + BOB))
    client = redis.Redis.from_url(redis_server.url)
    for key in client.scan_iter(match="distill:*"):
        assert ALICE.encode() not in key
        if client.type(key) == b"hash":
            assert all(ALICE.encode() not in v for v in client.hgetall(key).values())
    assert ALICE not in caplog.text and BOB not in caplog.text


def test_idempotency_key_replays_the_same_job(idle_client: TestClient) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = idle_client.post("/v1/jobs", json=BODY, headers=key)
    again = idle_client.post("/v1/jobs", json=BODY, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    other = idle_client.post("/v1/jobs", json={**BODY, "ipc": 2}, headers=key)
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"]
    fresh = idle_client.post("/v1/jobs", json=BODY)
    assert fresh.json()["id"] != first.json()["id"]


def test_listing_pages_newest_first_and_filters_by_state(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    key = uuid.uuid4().hex  # a key of its own: the listing holds only this test's jobs
    settings = make_settings(redis_server.url, tmp_path, queue_name=f"list-{key[:6]}", api_keys=key)
    with TestClient(create_app(settings), headers=_auth(key)) as idle_client:
        _check_listing(idle_client)


def _check_listing(idle_client: TestClient) -> None:
    ids = [idle_client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(7)]
    idle_client.post(f"/v1/jobs/{ids[2]}/cancel")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = idle_client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    canceled = idle_client.get("/v1/jobs", params={"state": "canceled"}).json()["jobs"]
    assert [j["id"] for j in canceled] == [ids[2]]
    queued = idle_client.get("/v1/jobs", params={"state": "queued", "limit": 2}).json()
    assert [j["id"] for j in queued["jobs"]] == [ids[6], ids[5]] and queued["next_cursor"]
    assert idle_client.get("/v1/jobs", params={"cursor": "!!"}).status_code == 422
    assert idle_client.get("/v1/jobs", params={"state": "lost"}).status_code == 422


def test_per_job_image_ceiling_is_configurable(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    settings = make_settings(
        redis_server.url, tmp_path, queue_name=f"cap-{uuid.uuid4().hex[:6]}", max_job_images=50
    )
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/jobs", json={"labels": ["a", "b"], "ipc": 25}).status_code == 202
        over = client.post("/v1/jobs", json={"labels": ["a", "b"], "ipc": 26})
        assert over.status_code == 422
        assert over.json()["detail"].startswith("ipc:")
        assert "DISTILL_MAX_JOB_IMAGES" in over.json()["detail"]


def test_queue_ceiling_answers_503_with_retry_after(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url, tmp_path, queue_name=f"full-{uuid.uuid4().hex[:6]}", max_queued_jobs=2
    )
    with TestClient(create_app(settings)) as client:
        assert [client.post("/v1/jobs", json=BODY).status_code for _ in range(2)] == [202, 202]
        full = client.post("/v1/jobs", json=BODY)
        assert full.status_code == 503
        assert int(full.headers["retry-after"]) > 0
        assert "limit 2" in full.json()["detail"]


def test_expired_jobs_answer_410_and_their_archives_are_swept(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url,
        tmp_path / "data",
        queue_name=f"ttl-{uuid.uuid4().hex[:6]}",
        result_ttl=3,
        sweep_interval=0.5,
        heartbeat_ttl=2,
    )
    worker: subprocess.Popen[bytes] = start_worker(settings, tiny_model, tmp_path / "w.log")
    try:
        with TestClient(create_app(settings)) as client:
            job = client.post("/v1/jobs", json=BODY).json()
            done = wait_for(client.get, job["id"])
            archive = settings.data_dir / f"{job['id']}.zip"
            assert done["state"] == "succeeded" and archive.exists()
            orphan = settings.data_dir / f".{'e' * 32}.zip.part"
            orphan.write_bytes(b"left behind by a crash")
            time.sleep(3.5)
            for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/archive"):
                gone = client.get(path)
                assert gone.status_code == 410, path
                assert gone.headers["content-type"] == "application/problem+json"
            deadline = time.monotonic() + 10
            while (archive.exists() or orphan.exists()) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not archive.exists() and not orphan.exists()
    finally:
        stop_worker(worker)


def test_callers_take_turns_in_the_queue(keyed: TestClient) -> None:
    """A caller's first job waits behind one job of each other caller, not all of them."""

    def submit(key: str) -> str:
        response = keyed.post("/v1/jobs", json=BODY, headers=_auth(key))
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def position(key: str, job_id: str) -> int:
        return int(keyed.get(f"/v1/jobs/{job_id}", headers=_auth(key)).json()["queue_position"])

    alice = [submit(ALICE) for _ in range(3)]
    bob = [submit(BOB)]
    assert [position(ALICE, j) for j in alice] == [0, 2, 3]
    assert position(BOB, bob[0]) == 1
    alice.append(submit(ALICE))  # Alice's round 3: last
    bob.append(submit(BOB))  # Bob's round 1: before Alice's round 2
    order = sorted(
        [(position(ALICE, j), "a") for j in alice] + [(position(BOB, j), "b") for j in bob]
    )
    assert "".join(who for _, who in order) == "ababaa"
    # Taking turns never loses or duplicates an entry.
    assert len({p for p, _ in order}) == 6 and max(p for p, _ in order) == 5


def test_a_worker_serves_callers_in_turns(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path
) -> None:
    """Real dequeues while entries move: every job runs once, and a caller who queued less
    is served alongside one who queued much more instead of after them."""
    settings = make_settings(
        redis_server.url,
        tmp_path / "data",
        queue_name=f"turns-{uuid.uuid4().hex[:6]}",
        api_keys=f"{ALICE}, {BOB}",
    )
    proc = start_worker(settings, tiny_model, tmp_path / "worker.log")
    body = {"labels": ["cat", "dog"], "ipc": 20, "augment": {"policy": "none"}}
    try:
        with TestClient(create_app(settings)) as client:
            alice = [
                client.post("/v1/jobs", json=body, headers=_auth(ALICE)).json()["id"]
                for _ in range(12)
            ]
            bob = [
                client.post("/v1/jobs", json=body, headers=_auth(BOB)).json()["id"]
                for _ in range(3)
            ]
            done = {
                **{j: wait_for(lambda p: client.get(p, headers=_auth(ALICE)), j) for j in alice},
                **{j: wait_for(lambda p: client.get(p, headers=_auth(BOB)), j) for j in bob},
            }
    finally:
        stop_worker(proc)
    assert all(job["state"] == "succeeded" and job["attempts"] == 1 for job in done.values())
    order = sorted(done, key=lambda j: done[j]["started_at"])
    # Bob's three jobs ran among Alice's first few, not after her twelve (FIFO: index 14).
    pattern = "".join("b" if j in bob else "a" for j in order)
    print(f"start order: {pattern}")
    assert max(order.index(j) for j in bob) <= 10, pattern  # FIFO would make it 14
