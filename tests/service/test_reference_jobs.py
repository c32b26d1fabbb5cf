"""Jobs that start from a reference set: real-image baselines and prototype-guided generation,
end to end through the API and a real worker."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.settings import Settings
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, run_job, serving, wait_for

CLASSES = ("cat", "dog", "ship")
PER_CLASS = 6


def _image(rng: np.random.Generator, side: int = 40) -> bytes:
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _reference() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    return {
        f"train/{n:03d}_{label}/{i}.png": _image(rng)
        for n, label in enumerate(CLASSES)
        for i in range(PER_CLASS)
    }


@pytest.fixture(scope="module")
def stack(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, TestClient, str]]:
    root = tmp_path_factory.mktemp("reference-jobs")
    named = root / "refs" / "pets"
    for member, data in _reference().items():
        (named / member).parent.mkdir(parents=True, exist_ok=True)
        (named / member).write_bytes(data)
    settings = make_settings(
        redis_server.url, root / "data", queue_name="reference-jobs", references_dir=root / "refs"
    )
    with serving(settings, tiny_model, root / "worker.log") as client:
        body = io.BytesIO()
        with zipfile.ZipFile(body, "w") as archive:
            for member, data in _reference().items():
                archive.writestr(member, data)
        made = client.post(
            "/v1/references",
            content=body.getvalue(),
            headers={"content-type": "application/zip"},
        )
        assert made.status_code == 201, made.text
        yield settings, client, made.json()["id"]


def _unzip(archive: bytes) -> tuple[dict[str, Any], zipfile.ZipFile]:
    zf = zipfile.ZipFile(io.BytesIO(archive))
    return json.loads(zf.read("manifest.json")), zf


def _body(**fields: Any) -> dict[str, Any]:
    return {
        "labels": ["dog", "cat"],
        "ipc": 2,
        "image_size": 16,
        "augment": {"policy": "none"},
        **fields,
    }


@pytest.mark.parametrize("method", ["random_real", "herding", "kcenter"])
def test_real_image_baselines_keep_picked_reference_images_by_digest(
    stack: tuple[Settings, TestClient, str], method: str
) -> None:
    _, client, ref = stack
    _, archive = run_job(client, _body(method=method, reference=ref))
    manifest, zf = _unzip(archive)
    originals = {hashlib.sha256(d).hexdigest(): d for d in _reference().values()}
    picked = manifest["reference"]["classes"]
    assert [c["label"] for c in picked] == ["dog", "cat"]  # the job's order
    assert [c["folder"] for c in picked] == ["001_dog", "000_cat"]
    for c in picked:
        assert len(c["picked"]) == 2 and len(set(c["picked"])) == 2
        folder = c["folder"]
        mine = {
            hashlib.sha256(d).hexdigest() for m, d in _reference().items() if f"/{folder}/" in m
        }
        assert set(c["picked"]) <= mine
    lines = [json.loads(x) for x in zf.read("train/metadata.jsonl").splitlines()]
    assert {x["kind"] for x in lines} == {"real"}
    assert {x["source"] for x in lines} == {
        f"reference:sha256:{d}" for c in picked for d in c["picked"]
    }
    # Each archived image is its reference image, shrunk: compare with a PIL bicubic resize.
    first = lines[0]
    digest = first["source"].rsplit(":", 1)[1]
    want = np.asarray(
        Image.open(io.BytesIO(originals[digest])).convert("RGB").resize((16, 16), Image.BICUBIC),
        dtype=np.int16,
    )
    got = np.asarray(Image.open(io.BytesIO(zf.read("train/" + first["file_name"]))), dtype=np.int16)
    assert np.abs(want - got).mean() < 12  # antialiased torch bicubic vs PIL bicubic
    assert manifest["counts"]["images"] == 4 and manifest["request"]["method"] == method
    assert "real" in zf.read("README.md").decode()
    _, again = run_job(client, _body(method=method, reference=ref))
    assert again == archive  # same request, same picks, same bytes


def test_a_named_set_and_augmented_copies_of_real_images(
    stack: tuple[Settings, TestClient, str],
) -> None:
    _, client, _ = stack
    body = _body(
        method="herding", reference="pets", ipc=4, augment={"policy": "paper", "copies": 1}
    )
    _, archive = run_job(client, body)
    manifest, zf = _unzip(archive)
    assert all(len(c["picked"]) == 2 for c in manifest["reference"]["classes"])
    kinds = [json.loads(x)["kind"] for x in zf.read("train/metadata.jsonl").splitlines()]
    assert kinds.count("real") == 4 and kinds.count("augmented") == 4


def test_prototypes_cluster_latents_and_run_image_to_image(
    stack: tuple[Settings, TestClient, str],
) -> None:
    _, client, ref = stack
    _, archive = run_job(client, _body(method="prototypes", reference=ref, strength=0.5))
    manifest, _ = _unzip(archive)
    proto = manifest["reference"]
    assert proto["method"] == "prototypes" and proto["strength"] == 0.5
    # One step at strength 0.5 needs two scheduled steps, so that int(2 * 0.5) = 1 runs.
    assert proto["image_to_image"]["num_inference_steps"] == 2
    assert proto["image_to_image"]["denoising_steps_run"] == 1
    assert proto["image_to_image"]["pipeline"] == "StableDiffusionXLImg2ImgPipeline"
    for c in proto["classes"]:
        sizes = [p["size"] for p in c["prototypes"]]
        assert len(sizes) == 2 and sum(sizes) == PER_CLASS and sizes == sorted(sizes, reverse=True)
    assert manifest["counts"]["generated"] == 4
    _, again = run_job(client, _body(method="prototypes", reference=ref, strength=0.5))
    assert again == archive


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"method": "herding"}, "needs a reference set"),
        ({"reference": "pets"}, "method generate uses no reference images"),
        ({"method": "herding", "reference": "nope"}, "no reference set 'nope'"),
        ({"method": "herding", "reference": "pets", "labels": ["cat", "frog", "emu"]}, "frog"),
        ({"method": "kcenter", "reference": "pets", "ipc": 7}, "needs 7 images per class"),
        ({"method": "random_real", "reference": "pets", "strength": 0.5}, "strength"),
    ],
)
def test_reference_requests_that_cannot_run_are_a_422(
    stack: tuple[Settings, TestClient, str], fields: dict[str, Any], says: str
) -> None:
    _, client, _ = stack
    response = client.post("/v1/jobs", json=_body(**fields))
    assert response.status_code == 422, response.text
    assert says in json.dumps(response.json()), response.text


def test_prototypes_sharded_give_the_same_archive_and_a_budget_job_runs(
    stack: tuple[Settings, TestClient, str],
) -> None:
    settings, client, ref = stack
    # 2 classes x 4 prototypes: two shards of one worker batch (4) each, as in one piece.
    body = _body(method="prototypes", reference=ref, strength=0.5, ipc=4)
    _, whole = run_job(client, body)
    with TestClient(create_app(settings.model_copy(update={"shard_images": 4}))) as sharding:
        job, parts = run_job(sharding, body)
    assert job["shards"] is not None and len(job["shards"]) == 2
    assert parts == whole
    budget = {**body, "ipc": None, "budget_seconds": 5.0}
    job, archive = run_job(client, {k: v for k, v in budget.items() if v is not None})
    manifest, _ = _unzip(archive)
    assert manifest["counts"]["images_per_class"] >= 1
    # Budget prototypes: min(50, the class's 6 images) clusters each.
    assert all(len(c["prototypes"]) == PER_CLASS for c in manifest["reference"]["classes"])


def test_the_evaluator_scores_a_real_image_archive_like_any_other(
    stack: tuple[Settings, TestClient, str], tmp_path: Path
) -> None:
    from worker.evaluate.train import evaluate

    _, client, ref = stack
    _, archive = run_job(client, _body(method="kcenter", reference=ref, labels=list(CLASSES)))
    path = tmp_path / "kcenter.zip"
    path.write_bytes(archive)
    test = tmp_path / "test"
    for member, data in _reference().items():
        (test / member.removeprefix("train/")).parent.mkdir(parents=True, exist_ok=True)
        (test / member.removeprefix("train/")).write_bytes(data)
    result = evaluate(path, test, runs=1, epochs=2, device="cpu", use_dsa=False, resize_test=True)
    scored = result.to_dict()
    assert 0.0 <= scored["mean"] <= 100.0 and len(scored["accuracies"]) == 1


@pytest.mark.parametrize("delete_when", ["submitted", "running"])
def test_deleting_a_set_that_a_job_reads_never_fails_it_as_internal(
    stack: tuple[Settings, TestClient, str], delete_when: str
) -> None:
    settings, client, _ = stack
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as archive:
        for member, data in _reference().items():
            archive.writestr(member, data)
    made = client.post(
        "/v1/references", content=body.getvalue(), headers={"content-type": "application/zip"}
    )
    assert made.status_code == 201, made.text
    ref = made.json()["id"]
    request = _body(method="prototypes", reference=ref, strength=0.5, labels=list(CLASSES))
    submitted = client.post("/v1/jobs", json=request)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    if delete_when == "running":
        wait_for(client.get, job_id, until=lambda job: job["state"] != "queued")
    assert client.delete(f"/v1/references/{ref}").status_code == 204
    job = wait_for(client.get, job_id)
    # Opened before the delete: it runs on the set as it was. Not yet opened: it fails as a
    # request naming a set that is gone. Never an internal error, never a server path.
    if job["state"] == "failed":
        error = job["error"]
        assert error["type"] == "invalid_request", job
        assert ref in error["detail"] and "deleted or expired" in error["detail"], job
        assert str(settings.data_dir) not in error["detail"], job
    else:
        assert job["state"] == "succeeded", job
