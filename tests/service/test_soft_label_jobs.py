"""Soft labels end to end: a job whose images a teacher trained on its reference set labels,
through the API and a real worker; the archive's soft_labels.pt, its metadata columns in
every format, the same bytes sharded or not, the 422s, and evaluations on soft labels."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from core.settings import Settings
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, run_job, serving, unpack_testset

CLASSES = ("cat", "dog", "ship")
PER_CLASS = 6
SOFT = {"teacher": "reference", "temperature": 2.0, "top_k": 2}


def _image(rng: np.random.Generator, tint: int, side: int = 24) -> bytes:
    pixels = rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
    pixels[..., tint] += 127  # a colour per class: something the teacher can learn
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _reference() -> bytes:
    rng = np.random.default_rng(3)
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
    root = tmp_path_factory.mktemp("soft-label-jobs")
    settings = make_settings(
        redis_server.url, root / "data", queue_name="soft-label-jobs", testsets_dir=root / "tests"
    )
    with serving(settings, tiny_model, root / "worker.log") as client:
        made = client.post(
            "/v1/references", content=_reference(), headers={"content-type": "application/zip"}
        )
        assert made.status_code == 201, made.text
        yield settings, client, made.json()["id"]


def _body(ref: str, **fields: Any) -> dict[str, Any]:
    return {
        "labels": list(CLASSES),
        "ipc": 4,
        "image_size": 16,
        "augment": {"policy": "paper", "copies": 1},
        "reference": ref,
        "soft_labels": SOFT,
        "formats": ["imagefolder", "parquet", "tensors"],
        **fields,
    }


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    exp = np.exp(scaled - scaled.max())
    out: np.ndarray = exp / exp.sum()
    return out


def _check_soft_archive(data: bytes, *, images: int, kinds: set[str]) -> dict[str, Any]:
    """The archive's soft labels agree with each other everywhere; returns its manifest."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    manifest = json.loads(zf.read("manifest.json"))
    soft = torch.load(io.BytesIO(zf.read("soft_labels.pt")), weights_only=True)
    assert soft["logits"].dtype == torch.float16
    assert tuple(soft["logits"].shape) == (images, len(CLASSES))
    assert soft["classes"] == list(CLASSES) and soft["temperature"] == SOFT["temperature"]
    assert soft["teacher"] == "reference"
    pngs = sorted(
        n.removeprefix("train/")
        for n in zf.namelist()
        if n.startswith("train/") and n.endswith(".png")
    )
    assert soft["files"] == sorted(soft["files"]) == pngs
    # Class-major, as tensors.pt.
    tensors = torch.load(io.BytesIO(zf.read("tensors.pt")), weights_only=True)
    assert torch.equal(soft["labels"], tensors["labels"])
    row_of = {name: i for i, name in enumerate(soft["files"])}
    lines = [json.loads(x) for x in zf.read("train/metadata.jsonl").splitlines()]
    assert len(lines) == images and {x["kind"] for x in lines} == kinds
    logits = soft["logits"].to(torch.float32).numpy()
    for line in lines:
        p = _softmax(logits[row_of[line["file_name"]]], SOFT["temperature"])
        order = np.argsort(-p, kind="stable")[: SOFT["top_k"]]
        assert line["soft_top_k"] == [int(i) for i in order]
        assert line["soft_top_p"] == pytest.approx([float(p[i]) for i in order], abs=1e-6)
        assert line["soft_top_p"] == sorted(line["soft_top_p"], reverse=True)
    entry = manifest["soft_labels"]
    assert entry["file"] == "soft_labels.pt" and entry["images"] == images
    assert entry["teacher"]["teacher"] == "reference"
    assert entry["teacher"]["trained_on"]["images"] == len(CLASSES) * PER_CLASS
    assert manifest["request"]["soft_labels"] == SOFT
    card = zf.read("README.md").decode()
    assert "soft labels" in card and "soft_labels.pt" in card
    return manifest


def test_a_generated_job_gets_a_teachers_soft_labels_everywhere(
    stack: tuple[Settings, TestClient, str], tmp_path: Path
) -> None:
    settings, client, ref = stack
    job, data = run_job(client, _body(ref))
    assert job["request"]["soft_labels"] == SOFT
    _check_soft_archive(data, images=12, kinds={"generated", "augmented"})

    # The Parquet shards carry the columns as datasets List features.
    import datasets

    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path / "x")
    loaded = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "x/data/train-*.parquet"), split="train"
    )
    assert loaded.features["soft_top_k"] == datasets.List(datasets.Value("int64"))
    assert loaded.features["soft_top_p"] == datasets.List(datasets.Value("float64"))
    lines = {
        json.loads(x)["file_name"]: json.loads(x)
        for x in (tmp_path / "x/train/metadata.jsonl").read_text().splitlines()
    }
    assert len(loaded) == 12
    paths = pq_paths(tmp_path / "x")
    assert len(paths) == 12
    for name, top_k, top_p in paths:
        assert lines[name]["soft_top_k"] == top_k and lines[name]["soft_top_p"] == top_p
    # The card's imagefolder features include the columns: the extracted folder loads as is.
    folder = datasets.load_dataset(str(tmp_path / "x"), split="train")
    assert folder.features["soft_top_k"] == datasets.List(datasets.Value("int64"))

    # Same request, same bytes; sharded (parts of at most 4 images), the same archive.
    _, again = run_job(client, _body(ref))
    assert again == data
    with TestClient(create_app(settings.model_copy(update={"shard_images": 4}))) as sharding:
        job, parts = run_job(sharding, _body(ref))
    assert job["shards"] is not None and len(job["shards"]) >= 2
    assert parts == data


def pq_paths(root: Path) -> list[tuple[str, list[int], list[float]]]:
    """(train/ file name, soft_top_k, soft_top_p) of every Parquet row, read with pyarrow."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    table = pq.read_table(root / "data")
    paths = [image["path"] for image in table.column("image").to_pylist()]
    return list(
        zip(
            paths,
            table.column("soft_top_k").to_pylist(),
            table.column("soft_top_p").to_pylist(),
            strict=True,
        )
    )


def test_real_images_get_soft_labels_too(stack: tuple[Settings, TestClient, str]) -> None:
    _, client, ref = stack
    body = _body(ref, method="random_real", augment={"policy": "none"}, ipc=3)
    _, data = run_job(client, body)
    manifest = _check_soft_archive(data, images=9, kinds={"real"})
    assert manifest["reference"]["classes"][0]["label"] == "cat"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"reference": None}, "soft_labels.teacher"),
        ({"soft_labels": {"teacher": "resnet18"}}, "soft_labels"),
        ({"soft_labels": {**SOFT, "top_k": 4}}, "soft_labels.top_k"),
        ({"soft_labels": {**SOFT, "temperature": 0.5}}, "soft_labels"),
        ({"labels": ["cat", "dog", "bird"]}, "reference"),
        ({"reference": "no-such-set"}, "reference"),
        ({"soft_labels": None}, "method generate uses no reference images"),
        (
            {"labels": None, "preset": "cifar100", "ipc": 1, "formats": ["challenge"]},
            "soft_labels: the challenge's file holds hard labels only",
        ),
    ],
)
def test_soft_label_requests_that_cannot_run_are_a_422(
    stack: tuple[Settings, TestClient, str], fields: dict[str, Any], says: str
) -> None:
    _, client, ref = stack
    body = {k: v for k, v in {**_body(ref), **fields}.items() if v is not None}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert says in json.dumps(response.json()), response.text


def _evaluate(client: TestClient, job_id: str, **fields: Any) -> dict[str, Any]:
    created = client.post(
        f"/v1/jobs/{job_id}/evaluations",
        json={"testset": "soft", "profile": "fast", "epochs": 2, "runs": 2, **fields},
    )
    assert created.status_code == 202, created.text
    evaluation = created.json()
    for _ in range(600):
        if evaluation["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
        evaluation = client.get(created.headers["location"]).json()
    assert evaluation["state"] == "succeeded", evaluation
    result: dict[str, Any] = evaluation["result"]
    return result


def test_evaluations_train_on_soft_labels_and_report_hard_beside_them(
    stack: tuple[Settings, TestClient, str],
) -> None:
    settings, client, ref = stack
    job, data = run_job(client, _body(ref, formats=["imagefolder"]))
    assert settings.testsets_dir is not None
    unpack_testset(data, settings.testsets_dir / "soft")
    soft = _evaluate(client, job["id"], labels="soft")
    assert soft["labels"] == "soft" and len(soft["accuracies"]) == 2
    assert soft["hard"] is not None and len(soft["hard"]["accuracies"]) == 2
    assert soft["protocol"]["soft_labels"]["temperature"] == SOFT["temperature"]
    hard = _evaluate(client, job["id"])
    assert hard["labels"] == "hard" and hard["hard"] is None
    # The hard runs of a soft evaluation are the hard evaluation's runs.
    assert soft["hard"]["accuracies"] == hard["accuracies"]

    plain, _ = run_job(client, {"labels": list(CLASSES), "ipc": 2, "image_size": 16})
    refused = client.post(
        f"/v1/jobs/{plain['id']}/evaluations", json={"testset": "soft", "labels": "soft"}
    )
    assert refused.status_code == 422, refused.text
    assert "labels" in refused.json()["detail"] and "soft_labels" in refused.json()["detail"]
