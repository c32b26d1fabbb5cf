"""The ``clip`` select scorer end to end: a worker holding a tiny random CLIPModel scores
each class's pool zero-shot against the class prompts, with no reference set; its scores
are CLIP's own (recomputed here from the archive's images), the manifest names the model,
the same request gives the same bytes in one piece and in shards; a worker without a CLIP
model says why, and requests for it are a 422."""

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
from core.spec import DatasetSpec, derive_seed
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, run_job, serving
from worker.model import clip as clip_model

CLASSES = ("cat", "dog", "ship")


@pytest.fixture(scope="module")
def clip_stack(
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tiny_clip: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, TestClient]]:
    root = tmp_path_factory.mktemp("clip-scorer")
    settings = make_settings(
        redis_server.url, root / "data", queue_name="clip-scorer", clip_scorer=str(tiny_clip)
    )
    with serving(settings, tiny_model, root / "worker.log") as client:
        yield settings, client


def _body(**fields: Any) -> dict[str, Any]:
    return {
        "labels": list(CLASSES),
        "ipc": 4,
        "image_size": 16,
        "seed": 9,
        "augment": {"policy": "paper", "copies": 1},
        "select": {"oversample": 3, "scorer": "clip", "keep": "confident"},
        **fields,
    }


def _generated(data: bytes) -> tuple[dict[str, Any], dict[str, list[tuple[int, np.ndarray]]]]:
    """The manifest, and each class's sampled (kept) images with their seeds, in order."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    lines = [json.loads(x) for x in zf.read("train/metadata.jsonl").splitlines()]
    kept: dict[str, list[tuple[int, np.ndarray]]] = {c: [] for c in CLASSES}
    for line in sorted(lines, key=lambda x: x["file_name"]):
        if line["kind"] == "generated":
            pixels = Image.open(io.BytesIO(zf.read(f"train/{line['file_name']}")))
            kept[line["label_name"]].append((line["seed"], np.asarray(pixels.convert("RGB"))))
    return json.loads(zf.read("manifest.json")), kept


def test_a_clip_select_job_scores_zero_shot_without_a_reference_set(
    clip_stack: tuple[Settings, TestClient], tiny_clip: Path
) -> None:
    settings, client = clip_stack
    models = client.get("/v1/models").json()["models"]
    assert models[0]["scorers"] == ["reference", "clip"]
    assert "clip_scorer" not in models[0]["unavailable"]
    ready = client.get("/readyz").json()
    assert any(w["scorers"] == ["reference", "clip"] for w in ready["workers"])

    job, data = run_job(client, _body())
    manifest, kept = _generated(data)
    select = manifest["select"]
    scorer = select["scorer"]
    assert scorer["scorer"] == "clip" and scorer["model"] == str(tiny_clip)
    assert scorer["fingerprint"] and scorer["image_size"] == 32
    assert scorer["prompts_per_class"] == [1, 1, 1]
    assert "trained_on" not in scorer
    card = zipfile.ZipFile(io.BytesIO(data)).read("README.md").decode()
    assert "scored by `clip` (CLIP " in card and "zero-shot over the class prompts" in card

    # The recorded scores are CLIP's zero-shot p(class) of the kept images, recomputed here
    # from the archive's (lossless) images with the same model.
    loaded, why = clip_model.load(
        Settings(model=str(tiny_clip), clip_scorer=str(tiny_clip)),
        device="cpu",
        dtype=torch.float32,
    )
    assert loaded is not None, why
    spec = DatasetSpec.model_validate(job["request"])
    text = np.stack([loaded.texts(spec.prompt_variants(c))[0] for c in spec.classes()])
    assert scorer["logit_scale"] == pytest.approx(loaded.logit_scale, abs=1e-5)
    for index, (cls, record) in enumerate(zip(CLASSES, select["classes"], strict=True)):
        # ipc 4 with one copy each: 2 sampled images kept of 3 x 2 candidates.
        assert record["pool"] == 6 and len(record["kept"]) == 2
        images = np.stack([pixels for _, pixels in kept[cls]])
        logits = loaded.logit_scale * loaded.images(images) @ text.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        assert probs[:, index] == pytest.approx(record["kept_scores"], abs=1e-4)
        # confident: the best p(class) of what the drop rule left, in that order.
        left = [j for j in range(6) if j not in record["dropped"]]
        assert record["kept"] == sorted(left, key=lambda j: (-record["scores"][j], j))[:2]
        # Sampled image n of the class is candidate kept[n]: its seed says so.
        assert [seed for seed, _ in kept[cls]] == [derive_seed(9, cls, j) for j in record["kept"]]

    # Same request, same bytes; in shards of whole classes, the same archive.
    _, again = run_job(client, _body())
    assert again == data
    with TestClient(create_app(settings.model_copy(update={"shard_images": 4}))) as sharding:
        sharded, parts = run_job(sharding, _body())
    assert sharded["shards"] is not None and len(sharded["shards"]) >= 2
    assert parts == data


def test_every_keep_rule_but_difficulty_runs_on_clip_features(
    clip_stack: tuple[Settings, TestClient],
) -> None:
    _, client = clip_stack
    for keep in ("kcenter", "herding"):
        _, data = run_job(client, _body(select={"oversample": 2, "scorer": "clip", "keep": keep}))
        manifest, kept = _generated(data)
        assert manifest["select"]["keep"] == keep
        assert all(len(images) == 2 for images in kept.values())
    response = client.post("/v1/jobs", json=_body(select={"scorer": "clip", "keep": "difficulty"}))
    assert response.status_code == 422
    assert "select.keep: difficulty" in response.text and "give reference" in response.text


def test_without_a_clip_model_the_worker_serves_and_clip_requests_are_a_422(
    client: TestClient, worker: Any
) -> None:
    """The session's worker has the default DISTILL_CLIP_SCORER, a hub id it cannot fetch
    offline: it runs, says why, and admission refuses the scorer naming the field."""
    models = client.get("/v1/models").json()["models"]
    assert models[0]["scorers"] == ["reference"]
    assert "openai/clip-vit-base-patch32" in models[0]["unavailable"]["clip_scorer"]
    response = client.post("/v1/jobs", json=_body())
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert "select.scorer" in json.dumps(problem) and "no worker" in problem["detail"]
    assert "DISTILL_CLIP_SCORER" in problem["detail"]
