"""The whole path through the API: submit, poll, download, check the archive file by file."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from core import keys
from core.settings import Settings
from core.states import JobState
from service import jobs
from service.auth import PUBLIC
from tests.conftest import CountingConnection, partial_path, run_job, wait_for

REQUEST = {
    "labels": ["cat", "dog", "ship"],
    "ipc": 10,
    "image_size": 32,
    "seed": 0,
    "prompt_template": "a photo of a {label}",
    "augment": {"policy": "paper", "copies": 4},
}


def test_job_end_to_end_archive_matches_request(
    client: TestClient, worker: subprocess.Popen[bytes], stack_settings: Settings
) -> None:
    job, data = run_job(client, REQUEST)

    assert job["progress"]["written"] == job["progress"]["total"] == 30
    assert job["progress"]["generated"] == 3 * 2  # ceil(10 / (4 + 1)) per class
    assert job["started_at"] and job["finished_at"] and job["worker"]
    assert job["archive"]["size_bytes"] == len(data)
    assert job["archive"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert job["archive"]["url"].endswith(f"/v1/jobs/{job['id']}/archive")

    zf = zipfile.ZipFile(io.BytesIO(data))
    names = zf.namelist()
    pngs = [n for n in names if n.startswith("train/") and n.endswith(".png")]
    assert "preview.png" in names
    assert len(pngs) == 30
    for index, label in enumerate(REQUEST["labels"]):
        folder = f"train/{index:03d}_{label}/"
        in_class = sorted(n for n in pngs if n.startswith(folder))
        assert in_class == [f"{folder}{index:03d}_{n:05d}.png" for n in range(10)]
        for name in in_class:
            image = Image.open(io.BytesIO(zf.read(name)))
            assert image.size == (32, 32) and image.mode == "RGB"

    lines = [json.loads(x) for x in zf.read("train/metadata.jsonl").decode().splitlines()]
    assert sorted("train/" + row["file_name"] for row in lines) == sorted(pngs)
    for row in lines:
        assert REQUEST["labels"][row["label"]] == row["label_name"]
        assert row["prompt"] == f"a photo of a {row['label_name']}"
        if row["kind"] == "augmented":
            assert row["source"] and row["source"] != row["file_name"]
            assert 1 <= row["copy"] <= 4
        else:
            assert row["kind"] == "generated" and row["source"] is None
    assert sum(row["kind"] == "generated" for row in lines) == 6

    manifest = json.loads(zf.read("manifest.json"))
    # The manifest holds the filled-in request, less the callback, the default prompt strategy
    # and absent soft labels (left out so that archives keep the bytes they had before).
    assert job["request"]["prompt_strategy"] == "template"
    assert job["request"]["soft_labels"] is None
    left_out = {"callback_url", "prompt_strategy", "soft_labels", "select"}
    assert manifest["request"] == {k: v for k, v in job["request"].items() if k not in left_out}
    assert manifest["class_to_idx"] == {"000_cat": 0, "001_dog": 1, "002_ship": 2}
    assert [c["label"] for c in manifest["classes"]] == ["cat", "dog", "ship"]
    assert manifest["counts"] == {
        "classes": 3,
        "images_per_class": 10,
        "images": 30,
        "generated": 6,
        "augmented": 24,
    }
    assert manifest["model"]["model"].endswith("tiny-sdxl")
    assert {"torch", "diffusers", "albumentations"} <= set(manifest["versions"])
    assert "timings" not in manifest and job["id"] not in json.dumps(manifest)
    assert job["timings"]["seconds_total"] >= job["timings"]["seconds_sampling"] > 0
    assert not list(Path(stack_settings.data_dir).glob("*.part"))


def test_uneven_ipc_keeps_exactly_ipc_per_class(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {"labels": ["apple", "aquarium_fish"], "ipc": 7, "augment": {"copies": 4}}
    _, data = run_job(client, body)
    zf = zipfile.ZipFile(io.BytesIO(data))
    rows = [json.loads(x) for x in zf.read("train/metadata.jsonl").decode().splitlines()]
    for index in (0, 1):
        mine = [r for r in rows if r["label"] == index]
        assert len(mine) == 7
        assert [r["kind"] for r in mine].count("generated") == 2
    assert rows[-1]["prompt"] == "a photo of a aquarium fish"


def _pixels(data: bytes) -> dict[str, np.ndarray]:
    zf = zipfile.ZipFile(io.BytesIO(data))
    return {
        n: np.asarray(Image.open(io.BytesIO(zf.read(n))))
        for n in zf.namelist()
        if n.startswith("train/") and n.endswith(".png")
    }


def test_same_seed_same_images_other_seed_other_images(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {"labels": ["cat", "dog"], "ipc": 5, "image_size": 16, "seed": 7}
    _, first = run_job(client, body)
    _, again = run_job(client, body)
    _, other = run_job(client, {**body, "seed": 8})

    a, b, c = _pixels(first), _pixels(again), _pixels(other)
    assert a.keys() == b.keys() == c.keys()
    zf_a, zf_b = zipfile.ZipFile(io.BytesIO(first)), zipfile.ZipFile(io.BytesIO(again))
    for name in a:
        assert zf_a.read(name) == zf_b.read(name), name
    assert zf_a.read("train/metadata.jsonl") == zf_b.read("train/metadata.jsonl")
    assert all(not np.array_equal(a[n], c[n]) for n in a)


def test_augmented_copies_differ_from_source_and_each_other(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    _, data = run_job(client, {"labels": ["horse"], "ipc": 5, "augment": {"policy": "paper"}})
    images = list(_pixels(data).values())
    assert len(images) == 5
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.array_equal(images[i], images[j]), (i, j)


def test_policy_none_writes_only_generated_images(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    job, data = run_job(client, {"labels": ["cat"], "ipc": 3, "augment": {"policy": "none"}})
    assert job["request"]["augment"]["copies"] == 0
    rows = zipfile.ZipFile(io.BytesIO(data)).read("train/metadata.jsonl").decode().splitlines()
    assert [json.loads(r)["kind"] for r in rows] == ["generated"] * 3


def test_custom_policy_runs(client: TestClient, worker: subprocess.Popen[bytes]) -> None:
    policy = [
        {"name": "RandomResizedCrop", "params": {"scale": [0.6, 1.0]}},
        {"name": "Rotate", "params": {"limit": 30, "p": 1.0, "border_mode": "constant"}},
        {"name": "ColorJitter", "params": {"p": 1.0}},
    ]
    job, data = run_job(
        client, {"labels": ["cat"], "ipc": 4, "image_size": 24, "augment": {"policy": policy}}
    )
    assert [s["name"] for s in job["request"]["augment"]["policy"]] == [
        "RandomResizedCrop",
        "Rotate",
        "ColorJitter",
    ]
    assert all(img.shape == (24, 24, 3) for img in _pixels(data).values())


def test_archive_is_409_until_finished_and_queued_job_cancels_at_once(
    idle_client: TestClient,
) -> None:
    job = idle_client.post("/v1/jobs", json=REQUEST).json()
    assert job["state"] == "queued"
    assert job["queue_position"] == 0

    early = idle_client.get(f"/v1/jobs/{job['id']}/archive")
    assert early.status_code == 409
    assert early.headers["content-type"] == "application/problem+json"
    assert "queued" in early.json()["detail"]

    canceled = idle_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["state"] == "canceled"
    assert idle_client.get(f"/v1/jobs/{job['id']}").json()["state"] == "canceled"
    assert idle_client.get(f"/v1/jobs/{job['id']}/archive").status_code == 409
    # Canceling again is harmless.
    assert idle_client.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "canceled"


def test_queue_positions_count_jobs_ahead(idle_client: TestClient) -> None:
    ids = [idle_client.post("/v1/jobs", json=REQUEST).json()["id"] for _ in range(3)]
    positions = [idle_client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids]
    assert positions == [0, 1, 2]
    idle_client.post(f"/v1/jobs/{ids[0]}/cancel")
    assert idle_client.get(f"/v1/jobs/{ids[2]}").json()["queue_position"] == 1


def test_running_job_cancels_between_batches_and_leaves_no_files(
    client: TestClient,
    worker: subprocess.Popen[bytes],
    stack_settings: Settings,
    redis: Redis,
) -> None:
    labels = [f"class {i}" for i in range(100)]
    body = {"labels": labels, "ipc": 100, "augment": {"policy": "none"}}
    job = client.post("/v1/jobs", json=body).json()
    running = wait_for(
        client.get, job["id"], until=lambda j: j["progress"]["written"] > 0, timeout=60
    )
    assert running["state"] == "running"
    assert running["progress"]["images_per_second"] > 0
    assert running["progress"]["eta_seconds"] > 0
    partial = partial_path(stack_settings.data_dir, job["id"])
    assert partial.exists()

    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["cancel_requested"] is True
    final = wait_for(client.get, job["id"], timeout=30)
    assert final["state"] == "canceled"
    assert final["progress"]["written"] < 100 * 100
    assert not partial.exists()
    assert not (stack_settings.data_dir / keys.archive(job["id"])).exists()
    assert client.get(f"/v1/jobs/{job['id']}/archive").status_code == 409
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "canceled"


def test_cancel_of_finished_job_is_409(client: TestClient, worker: subprocess.Popen[bytes]) -> None:
    job, _ = run_job(client, {"labels": ["cat"], "ipc": 1})
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"


def test_unknown_job_is_404_problem(client: TestClient) -> None:
    for path in ("/v1/jobs/" + "0" * 32, "/v1/jobs/../etc", "/v1/jobs/nothex/archive"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
    assert client.post("/v1/jobs/" + "f" * 32 + "/cancel").status_code == 404


def test_archive_etag_range_and_conditional_get(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    job, data = run_job(client, {"labels": ["cat"], "ipc": 2})
    url = f"/v1/jobs/{job['id']}/archive"
    full = client.get(url)
    assert full.headers["etag"] == f'"{job["archive"]["sha256"]}"'
    assert full.headers["content-type"] == "application/zip"
    assert "attachment" in full.headers["content-disposition"]
    part = client.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == data[10:100]
    assert client.get(url, headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    # RFC 9110: a Range of another unit, a malformed or a multi-part one is ignored (200,
    # whole); only a well-formed range past the end is a 416, as a problem.
    for ignored in ("items=0-10", "bytes=abc", "bytes=5-2", "bytes=0-1,4-5", "bytes"):
        whole = client.get(url, headers={"Range": ignored})
        assert whole.status_code == 200, ignored
        assert whole.content == data, ignored
    beyond = client.get(url, headers={"Range": f"bytes={len(data) + 10}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-type"] == "application/problem+json"
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert beyond.json()["status"] == 416


def test_list_jobs_newest_first(client: TestClient, worker: subprocess.Popen[bytes]) -> None:
    first, _ = run_job(client, {"labels": ["a"], "ipc": 1})
    second, _ = run_job(client, {"labels": ["b"], "ipc": 1})
    listed = [j["id"] for j in client.get("/v1/jobs?limit=200").json()["jobs"]]
    assert listed.index(second["id"]) < listed.index(first["id"])


def test_readyz_reports_the_loaded_worker(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert any(w["state"] == "ready" and w["device"] == "cpu" for w in body["workers"])
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_without_workers_or_redis_is_503(redis_server: Any, tmp_path: Path) -> None:
    from service.app import create_app
    from tests.conftest import make_settings

    # A database no worker has written to: Redis answers, nobody is loaded.
    empty = make_settings(redis_server.url.rsplit("/", 1)[0] + "/5", tmp_path)
    with TestClient(create_app(empty)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "no worker" in response.json()["detail"]

    dead = make_settings("redis://127.0.0.1:1/0", tmp_path)
    with TestClient(create_app(dead)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["redis"].startswith("unreachable")
        down = client.get("/v1/jobs/" + "a" * 32)
        assert down.status_code == 503
        assert down.headers["retry-after"]
        assert down.headers["content-type"] == "application/problem+json"


def test_new_job_shows_empty_progress(idle_client: TestClient) -> None:
    job = idle_client.post("/v1/jobs", json={"labels": ["x"], "ipc": 1}).json()
    assert job["state"] == "queued"
    assert job["progress"] == {
        "generated": 0,
        "written": 0,
        "total": 1,
        "images_per_second": None,
        "eta_seconds": None,
        "ipc_reached": None,
    }


def test_prefer_wait_answers_200_with_the_finished_job(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    response = client.post(
        "/v1/jobs", json={"labels": ["cat"], "ipc": 2}, headers={"Prefer": "wait=30"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == "wait=30"
    assert response.json()["state"] == "succeeded"
    assert response.json()["archive"]["sha256"]


def test_prefer_wait_times_out_to_202(idle_client: TestClient) -> None:
    response = idle_client.post(
        "/v1/jobs", json={"labels": ["cat"], "ipc": 2}, headers={"Prefer": "respond-async, wait=1"}
    )
    assert response.status_code == 202
    assert response.json()["state"] == "queued"


def test_reads_only_read_a_running_job_in_one_round_trip(
    client: TestClient,
    worker: subprocess.Popen[bytes],
    stack_settings: Settings,
    counted: Redis,
) -> None:
    """A status read is one Redis round trip and a listing page one index read plus one
    pipeline, while the job runs: no registry cleanup or other maintenance on a GET."""
    body = {"labels": [f"class {i}" for i in range(20)], "ipc": 50, "augment": {"policy": "none"}}
    job = client.post("/v1/jobs", json=body).json()
    wait_for(client.get, job["id"], until=lambda j: j["state"] == "running", timeout=60)
    before = CountingConnection.sends
    view = jobs.fetch(counted, stack_settings, job["id"], owner=PUBLIC, archive_url="")
    assert CountingConnection.sends - before == 1
    assert view.state is JobState.running
    before = CountingConnection.sends
    page, _ = jobs.list_page(
        counted,
        stack_settings,
        owner=PUBLIC,
        state=None,
        limit=20,
        cursor=None,
        archive_url_for=lambda i: i,
    )
    assert CountingConnection.sends - before == 2
    assert job["id"] in [j.id for j in page]
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert wait_for(client.get, job["id"])["state"] == "canceled"


def test_a_tiny_decoder_job_runs_end_to_end_and_says_which_decoder(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {"labels": ["cat", "dog"], "ipc": 3, "image_size": 16, "decoder": "tiny"}
    job, data = run_job(client, body)
    assert job["request"]["decoder"] == "tiny" and job["progress"]["written"] == 6
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("manifest.json"))
    assert manifest["request"]["decoder"] == "tiny"
    assert manifest["decoder"]["decoder"] == "tiny"
    assert manifest["decoder"]["class"] == "AutoencoderTiny"
    assert manifest["decoder"]["local_fingerprint"]
    _, vae = run_job(client, {**body, "decoder": "vae"})
    assert (
        json.loads(zipfile.ZipFile(io.BytesIO(vae)).read("manifest.json"))["decoder"]["class"]
        == "AutoencoderKL"
    )
    tiny_pixels, vae_pixels = _pixels(data), _pixels(vae)
    assert tiny_pixels.keys() == vae_pixels.keys()
    # The same latents, decoded another way.
    assert any(not np.array_equal(tiny_pixels[k], vae_pixels[k]) for k in tiny_pixels)
