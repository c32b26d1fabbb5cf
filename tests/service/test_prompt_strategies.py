"""prompt_strategy end to end on the tiny model: each image's prompt is drawn per image, the
manifest and card say which strategy, and the same request gives the same bytes."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from typing import Any

from fastapi.testclient import TestClient

from core import prompts
from tests.conftest import run_job

JOB: dict[str, Any] = {
    "labels": ["cat", "dog"],
    "ipc": 8,
    "seed": 3,
    "image_size": 16,
    "augment": {"policy": "none"},
    "prompt_strategy": "domains",
}


def test_domains_job_varies_prompts_and_records_the_strategy(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    _, data = run_job(client, JOB)
    _, again = run_job(client, JOB)
    assert again == data

    zf = zipfile.ZipFile(io.BytesIO(data))
    lines = [json.loads(x) for x in zf.read("train/metadata.jsonl").decode().splitlines()]
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["request"]["prompt_strategy"] == "domains"
    for index, label in enumerate(JOB["labels"]):
        used = [line["prompt"] for line in lines if line["label"] == index]
        allowed = {f"a {domain} of a {label}" for domain in prompts.DOMAINS}
        assert len(used) == 8 and set(used) <= allowed and len(set(used)) > 1
        assert manifest["classes"][index]["prompts"] == sorted(allowed)
    assert (
        "| prompts | strategy `domains`: each image's prompt is drawn"
        in zf.read("README.md").decode()
    )


def test_default_strategy_is_left_out_of_the_manifest(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {**JOB, "ipc": 2}
    del body["prompt_strategy"]
    _, data = run_job(client, body)
    zf = zipfile.ZipFile(io.BytesIO(data))
    manifest = json.loads(zf.read("manifest.json"))
    assert "prompt_strategy" not in manifest["request"]
    assert manifest["classes"][0]["prompts"] == ["a photo of a cat"]
    assert "| prompts | strategy" not in zf.read("README.md").decode()


def test_unknown_strategy_and_strategy_with_template_are_422(client: TestClient) -> None:
    unknown = client.post("/v1/jobs", json={**JOB, "prompt_strategy": "haiku"})
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "prompt_strategy"
    both = client.post("/v1/jobs", json={**JOB, "prompt_template": "art of a {label}"})
    assert both.status_code == 422
    assert both.json()["errors"][0]["message"].startswith("prompt_strategy: domains makes")


def test_a_guidance_range_draws_a_scale_per_image_and_records_it(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    from core.spec import DatasetSpec

    body = {
        "labels": ["cat", "dog"],
        "ipc": 6,
        "seed": 8,
        "image_size": 16,
        "augment": {"policy": "paper", "copies": 1},
        "guidance_scale": [1.5, 6],
        "formats": ["imagefolder", "parquet"],
    }
    job, data = run_job(client, body)
    assert job["request"]["guidance_scale"] == [1.5, 6.0]
    _, again = run_job(client, body)
    assert again == data

    spec = DatasetSpec.model_validate(job["request"])
    zf = zipfile.ZipFile(io.BytesIO(data))
    lines = [json.loads(x) for x in zf.read("train/metadata.jsonl").decode().splitlines()]
    generated = {line["file_name"]: line for line in lines if line["kind"] == "generated"}
    scales = [line["guidance_scale"] for line in generated.values()]
    assert len(scales) == 6 and len(set(scales)) == 6
    for line in lines:
        # Each image's scale is its seed's draw; a copy has its source's.
        assert line["guidance_scale"] == spec.guidance_for(line["seed"])
        assert 1.5 <= line["guidance_scale"] <= 6.0
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["model"]["guidance_scale"] == [1.5, 6.0]
    assert "derive_seed(image seed, 'guidance')" in manifest["model"]["guidance_per_image"]
    card = zf.read("README.md").decode()
    assert "name: guidance_scale" in card and "dtype: float64" in card

    # The Parquet shards carry the column, typed as the card says.
    import pyarrow.parquet as pq

    shard = next(n for n in zf.namelist() if n.startswith("data/train-"))
    table = pq.read_table(io.BytesIO(zf.read(shard)))
    assert str(table.schema.field("guidance_scale").type) == "double"
    assert sorted(table.column("guidance_scale").to_pylist()) == sorted(
        line["guidance_scale"] for line in lines
    )


def test_guidance_ranges_that_cannot_run_are_422(client: TestClient) -> None:
    for scale, says in (
        ([4.0, 2.0], "low < high"),
        ([0.0, 1.0], "above 1"),
        ([1.0, 30.0], "less than or equal to 20"),
        ([1.0, 2.0, 3.0], "guidance_scale"),
    ):
        response = client.post(
            "/v1/jobs", json={"labels": ["cat"], "ipc": 2, "guidance_scale": scale}
        )
        assert response.status_code == 422, response.text
        assert "guidance_scale" in response.text and says in response.text, response.text
