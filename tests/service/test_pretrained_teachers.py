"""Pretrained soft-label teachers end to end: a worker loads the classifiers of
DISTILL_TEACHERS (a tiny random ResNet on CIFAR-10's classes, and one that cannot be
loaded), publishes what it has, and labels a job's images with the logits of the job's
classes (recomputed here from the archive's images with the same model), in one piece and in
shards, with the same bytes each time; a teacher no worker loaded, or one without a class of
the job, is a 422 naming soft_labels.teacher; an evaluation trains on those labels."""

from __future__ import annotations

import io
import json
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
from tests.conftest import make_settings, run_job, serving, start_worker, stop_worker, wait_for
from worker.model import classifier as classifier_model

#: In the job's order, which is not the teacher's (CIFAR-10: cat 3, dog 5, ship 8, bird 2).
CLASSES = ("ship", "cat", "dog", "bird")
COLUMNS = [8, 3, 5, 2]
MISSING = "/nonexistent/teacher"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.model.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-teacher", family="classifier")


@pytest.fixture(scope="module")
def teacher_stack(
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tiny_teacher: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, TestClient]]:
    root = tmp_path_factory.mktemp("pretrained-teachers")
    settings = make_settings(
        redis_server.url,
        root / "data",
        queue_name="pretrained-teachers",
        teachers=f"{tiny_teacher}, {MISSING}",
    )
    with serving(settings, tiny_model, root / "worker.log") as client:
        yield settings, client


def _body(teacher: Path | str, **fields: Any) -> dict[str, Any]:
    return {
        "labels": list(CLASSES),
        "ipc": 6,
        "image_size": 16,
        "seed": 5,
        "augment": {"policy": "paper", "copies": 2},
        "soft_labels": {"teacher": str(teacher), "temperature": 3.0, "top_k": 2},
        "formats": ["imagefolder", "parquet"],
        **fields,
    }


def test_a_pretrained_teacher_labels_every_image_with_its_columns_of_the_jobs_classes(
    teacher_stack: tuple[Settings, TestClient], tiny_teacher: Path
) -> None:
    settings, client = teacher_stack
    entry = client.get("/v1/models").json()["models"][0]
    assert entry["teachers"] == [str(tiny_teacher)]
    assert MISSING in entry["unavailable"][f"teacher {MISSING}"]
    ready = client.get("/readyz").json()
    assert any(w["teachers"] == [str(tiny_teacher)] for w in ready["workers"])

    _, data = run_job(client, _body(tiny_teacher))
    zf = zipfile.ZipFile(io.BytesIO(data))
    manifest = json.loads(zf.read("manifest.json"))
    teacher = manifest["soft_labels"]["teacher"]
    assert teacher["teacher"] == str(tiny_teacher)
    assert teacher["network"] == "ResNetForImageClassification" and teacher["classes"] == 10
    assert [c["column"] for c in teacher["columns"]] == COLUMNS
    assert [c["name"] for c in teacher["columns"]] == list(CLASSES)
    assert teacher["fingerprint"] and "train_accuracy" not in teacher
    card = zf.read("README.md").decode()
    assert f"teacher `{tiny_teacher}` (ResNetForImageClassification, pretrained" in card

    # Every row of soft_labels.pt is the teacher's logits of the job's classes for that
    # (lossless) image, recomputed here with the same model.
    loaded, failed = classifier_model.load_all(
        Settings(model=str(tiny_teacher), teachers=str(tiny_teacher)), device="cpu"
    )
    assert failed == {}
    model = loaded[str(tiny_teacher)]
    soft = torch.load(io.BytesIO(zf.read("soft_labels.pt")), weights_only=True)
    assert soft["teacher"] == str(tiny_teacher) and soft["classes"] == list(CLASSES)
    assert tuple(soft["logits"].shape) == (len(CLASSES) * 6, len(CLASSES))
    for row, name in enumerate(soft["files"]):
        pixels = np.asarray(Image.open(io.BytesIO(zf.read(f"train/{name}"))).convert("RGB"))
        expected = model.logits(pixels)[COLUMNS].astype(np.float16)
        assert np.array_equal(soft["logits"][row].numpy(), expected), name

    # Same request, same bytes; in shards, the same archive.
    _, again = run_job(client, _body(tiny_teacher))
    assert again == data
    with TestClient(create_app(settings.model_copy(update={"shard_images": 4}))) as sharding:
        sharded, parts = run_job(sharding, _body(tiny_teacher))
    assert sharded["shards"] is not None and len(sharded["shards"]) >= 2
    assert parts == data


@pytest.mark.parametrize(
    ("teacher", "labels", "says"),
    [
        ("resnet18", CLASSES, "no worker of"),
        (MISSING, CLASSES, "nonexistent"),
        (None, ("cat", "zebra", "dog", "cat, dog"), "labels[1] 'zebra' is none of the teacher"),
    ],
)
def test_teachers_that_cannot_label_the_job_are_a_422_naming_the_field(
    teacher_stack: tuple[Settings, TestClient],
    tiny_teacher: Path,
    teacher: str | None,
    labels: tuple[str, ...],
    says: str,
) -> None:
    _, client = teacher_stack
    body = _body(teacher or tiny_teacher, labels=list(labels))
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["errors"][0]["field"] == "soft_labels.teacher", problem
    assert says in problem["detail"], problem
    if teacher is None:  # every class it cannot label is named, an ambiguous one too
        several = "labels[3] 'cat, dog' names several of the teacher's classes (3, 5)"
        assert several in problem["detail"]
    else:
        assert str(tiny_teacher) in problem["detail"]  # what is loaded instead


def test_without_ready_workers_a_teacher_request_waits_and_the_worker_judges_it(
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tiny_teacher: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No ready worker: admission cannot know the teachers, so the jobs are accepted and
    wait; the worker then applies the same rules, and the jobs fail as invalid requests
    that say why (never as internal errors)."""
    root = tmp_path_factory.mktemp("teacher-waits")
    settings = make_settings(
        redis_server.url, root / "data", queue_name="teacher-waits", teachers=str(tiny_teacher)
    )
    with TestClient(create_app(settings)) as client:
        unknown = client.post("/v1/jobs", json=_body("some/classifier"))
        unmatched = client.post("/v1/jobs", json=_body(tiny_teacher, labels=["cat", "zebra"]))
        assert unknown.status_code == unmatched.status_code == 202, unknown.text
        assert client.get(f"/v1/jobs/{unknown.json()['id']}").json()["state"] == "queued"
        proc = start_worker(settings, tiny_model, root / "worker.log")
        try:
            failed = [wait_for(client.get, r.json()["id"]) for r in (unknown, unmatched)]
        finally:
            stop_worker(proc)
    for job in failed:
        assert job["state"] == "failed" and job["error"]["type"] == "invalid_request", job
    assert "this worker has no teacher 'some/classifier'" in failed[0]["error"]["detail"]
    assert str(tiny_teacher) in failed[0]["error"]["detail"]  # what it loaded instead
    assert "labels[1] 'zebra' is none of the teacher's 10" in failed[1]["error"]["detail"]
