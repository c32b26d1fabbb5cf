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
