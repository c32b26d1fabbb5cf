"""Oversample and select end to end: jobs whose pools a scorer trained on their reference set
picks from, through the API and a real worker; the manifest's record of every pool, the
same bytes again and sharded, one network for select and soft labels, and the 422s."""

from __future__ import annotations

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
from core.spec import derive_seed
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, run_job, serving
from worker.selection.oversample import match_difficulty

CLASSES = ("cat", "dog", "ship")
PER_CLASS = 6


def _image(rng: np.random.Generator, tint: int, side: int = 24) -> bytes:
    pixels = rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
    pixels[..., tint] += 127  # a colour per class: something the scorer can learn
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _reference() -> bytes:
    rng = np.random.default_rng(5)
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as archive:
        for n, label in enumerate(CLASSES):
            for i in range(PER_CLASS):
                archive.writestr(f"train/{n:03d}_{label}/{i}.png", _image(rng, n))
    return body.getvalue()


@pytest.fixture(scope="module")
def stack(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, TestClient, str]]:
    root = tmp_path_factory.mktemp("select-jobs")
    settings = make_settings(redis_server.url, root / "data", queue_name="select-jobs")
    with serving(settings, tiny_model, root / "worker.log") as client:
        made = client.post(
            "/v1/references", content=_reference(), headers={"content-type": "application/zip"}
        )
        assert made.status_code == 201, made.text
        yield settings, client, made.json()["id"]


def _body(ref: str, **fields: Any) -> dict[str, Any]:
    return {
        "labels": list(CLASSES),
        "ipc": 6,
        "image_size": 16,
        "seed": 4,
        "augment": {"policy": "paper", "copies": 1},
        "reference": ref,
        "select": {"oversample": 3, "keep": "confident"},
        **fields,
    }


def _read(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]], zipfile.ZipFile]:
    zf = zipfile.ZipFile(io.BytesIO(data))
    lines = [json.loads(x) for x in zf.read("train/metadata.jsonl").splitlines()]
    return json.loads(zf.read("manifest.json")), lines, zf


def _check_record(manifest: dict[str, Any], lines: list[dict[str, Any]], *, pool: int) -> None:
    """The manifest's select section agrees with itself and with the images' seeds."""
    select = manifest["select"]
    kept_per_class = len(lines) // len(CLASSES) // 2  # one copy per kept image
    assert select["pool_per_class"] == pool and select["kept_per_class"] == kept_per_class
    assert select["scorer"]["scorer"] == "reference"
    assert select["scorer"]["trained_on"]["images"] == len(CLASSES) * PER_CLASS
    assert [c["label"] for c in select["classes"]] == list(CLASSES)
    for cls, record in zip(CLASSES, select["classes"], strict=True):
        assert record["pool"] == pool and len(record["scores"]) == pool
        assert len(record["kept"]) == len(set(record["kept"])) == kept_per_class
        assert all(0 <= j < pool for j in record["kept"])
        assert record["kept_scores"] == [record["scores"][j] for j in record["kept"]]
        assert set(record["dropped"]) <= set(record["misclassified"]) <= set(range(pool))
        assert not set(record["dropped"]) & set(record["kept"])
        # Sampled image n of the class is candidate kept[n]: its seed says so.
        generated = sorted(
            (x for x in lines if x["kind"] == "generated" and x["label_name"] == cls),
            key=lambda x: x["file_name"],
        )
        seeds = [derive_seed(4, cls, j) for j in record["kept"]]
        assert [x["seed"] for x in generated] == seeds
    counts = manifest["counts"]
    assert counts["generated"] == pool * len(CLASSES)
    assert counts["kept"] == kept_per_class * len(CLASSES)
    assert counts["augmented"] == counts["images"] - counts["kept"]


def test_a_select_job_keeps_the_scorers_choice_and_records_every_pool(
    stack: tuple[Settings, TestClient, str],
) -> None:
    settings, client, ref = stack
    job, data = run_job(client, _body(ref))
    assert job["request"]["select"] == {"oversample": 3, "scorer": "reference", "keep": "confident"}
    manifest, lines, zf = _read(data)
    assert len(lines) == 18
    _check_record(manifest, lines, pool=9)
    assert manifest["request"]["select"]["oversample"] == 3
    for record in manifest["select"]["classes"]:
        # confident: the highest scores of what was left, best first.
        assert record["kept_scores"] == sorted(record["kept_scores"], reverse=True)
        left = [j for j in range(9) if j not in record["dropped"]]
        best = sorted(left, key=lambda j: (-record["scores"][j], j))[:3]
        assert record["kept"] == best
    card = zf.read("README.md").decode()
    assert "selection" in card and "3 of 9 candidates per class kept by `confident`" in card

    # Same request, same bytes; cut into shards of whole classes, the same archive.
    _, again = run_job(client, _body(ref))
    assert again == data
    with TestClient(create_app(settings.model_copy(update={"shard_images": 6}))) as sharding:
        job, parts = run_job(sharding, _body(ref))
    assert job["shards"] is not None and len(job["shards"]) >= 2
    assert parts == data


def test_oversample_1_keeps_the_plain_jobs_images(stack: tuple[Settings, TestClient, str]) -> None:
    _, client, ref = stack
    body = _body(ref, augment={"policy": "none"}, ipc=3)
    _, selected = run_job(client, {**body, "select": {"oversample": 1}})
    plain = {k: v for k, v in body.items() if k not in ("select", "reference")}
    _, unselected = run_job(client, plain)

    def pngs(data: bytes) -> set[bytes]:
        zf = zipfile.ZipFile(io.BytesIO(data))
        return {zf.read(n) for n in zf.namelist() if n.endswith(".png") and "/" in n}

    # The same images (the kept order, by score, may renumber them within their class).
    assert pngs(selected) == pngs(unselected)
    manifest, _, _ = _read(selected)
    assert all(
        c["pool"] == 3 and sorted(c["kept"]) == [0, 1, 2] for c in manifest["select"]["classes"]
    )


@pytest.mark.parametrize("keep", ["herding", "kcenter", "difficulty"])
def test_every_keep_rule_runs_and_is_recorded(
    stack: tuple[Settings, TestClient, str], keep: str
) -> None:
    _, client, ref = stack
    _, data = run_job(client, _body(ref, select={"oversample": 2, "keep": keep}))
    manifest, lines, _ = _read(data)
    _check_record(manifest, lines, pool=6)
    assert manifest["select"]["keep"] == keep
    for record in manifest["select"]["classes"]:
        if keep != "difficulty":
            assert "difficulty_targets" not in record
            continue
        # Each reference quantile took the nearest candidate left (of those not dropped).
        targets = record["difficulty_targets"]
        assert len(targets) == 3 and targets == sorted(targets)
        left = [j for j in range(6) if j not in record["dropped"]]
        difficulty = 1 - np.array(record["scores"])[left]
        assert record["kept"] == [left[i] for i in match_difficulty(difficulty, np.array(targets))]


def test_select_and_soft_labels_share_one_network(stack: tuple[Settings, TestClient, str]) -> None:
    _, client, ref = stack
    body = _body(ref, soft_labels={"teacher": "reference", "top_k": 2})
    _, data = run_job(client, body)
    manifest, lines, zf = _read(data)
    assert "soft_labels.pt" in zf.namelist() and all(len(x["soft_top_k"]) == 2 for x in lines)
    teacher, scorer = manifest["soft_labels"]["teacher"], manifest["select"]["scorer"]
    assert teacher["train_accuracy"] == scorer["train_accuracy"]
    assert teacher["trained_on"] == scorer["trained_on"]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"reference": None}, "select.scorer"),
        ({"method": "random_real", "augment": {"policy": "none"}}, "select: method random_real"),
        ({"ipc": None, "budget_seconds": 30.0}, "select: takes ipc"),
        ({"select": {"oversample": 9}}, "select.oversample"),
        ({"select": {"oversample": 0}}, "select.oversample"),
        ({"select": {"scorer": "openclip"}}, "select.scorer"),
        ({"select": {"keep": "best"}}, "select.keep"),
        ({"select": {"pool": 3}}, "select.pool"),
        (
            {"ipc": 1000, "image_size": 512, "select": {"oversample": 8}},
            "select.oversample: a class's pool of 4000 candidates at 512 px",
        ),
        ({"labels": ["cat", "dog", "bird"]}, "reference"),
        ({"select": None}, "method generate uses no reference images"),
    ],
)
def test_select_requests_that_cannot_run_are_a_422(
    stack: tuple[Settings, TestClient, str], fields: dict[str, Any], says: str
) -> None:
    _, client, ref = stack
    body = {k: v for k, v in {**_body(ref), **fields}.items() if v is not None}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert says in json.dumps(response.json()), response.text
