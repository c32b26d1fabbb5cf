"""Several models per deployment: aliases, one queue each, families, defaults, GET /v1/models."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core import models, presets
from core.settings import Settings
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, run_job, start_worker, stop_worker

SMALL = {"ipc": 2, "image_size": 16, "augment": {"policy": "none"}}


def _three_models(redis_url: str, data: Path, sdxl: Path, sd: Path, dit: Path) -> Settings:
    return make_settings(
        redis_url,
        data,
        queue_name=f"models-{uuid.uuid4().hex[:6]}",
        models=f"turbo={sdxl},sd-turbo={sd},dit={dit}",
        model="turbo",
    )


@pytest.fixture(scope="module")
def deployment(
    redis_server: EmbeddedRedis,
    tiny_model: Path,
    tiny_sd: Path,
    tiny_dit: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, TestClient]]:
    """One API, one worker per model (each on its own queue)."""
    root = tmp_path_factory.mktemp("models-deployment")
    settings = _three_models(redis_server.url, root / "data", tiny_model, tiny_sd, tiny_dit)
    procs = []
    try:
        for alias, path in (("turbo", tiny_model), ("sd-turbo", tiny_sd), ("dit", tiny_dit)):
            own = settings.model_copy(update={"model": alias})
            procs.append(start_worker(own, path, root / f"{alias}.log"))
        with TestClient(create_app(settings)) as client:
            yield settings, client
    finally:
        for proc in procs:
            stop_worker(proc)


def _manifest(archive: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        manifest: dict[str, Any] = json.loads(zf.read("manifest.json"))
        return manifest


def test_the_catalogue_gives_each_alias_a_queue_and_keeps_the_single_model_one() -> None:
    single = Settings(model="stabilityai/sdxl-turbo", queue_name="distill")
    (entry,) = models.catalogue(single).values()
    assert (entry.alias, entry.queue, entry.family) == ("sdxl-turbo", "distill", "sdxl")
    several = Settings(
        queue_name="distill",
        models="sdxl-turbo=stabilityai/sdxl-turbo,dit=facebook/DiT-XL-2-256,"
        "sd=stabilityai/sd-turbo",
        model="dit",
    )
    served = models.catalogue(several)
    assert [e.queue for e in served.values()] == ["distill", "distill-dit", "distill-sd"]
    dit = served["dit"]
    assert (dit.family, dit.pipeline, dit.class_conditional) == ("dit", "DiTPipeline", True)
    assert (dit.defaults.steps, dit.defaults.guidance_scale, dit.defaults.resolution) == (
        25,
        4.0,
        256,
    )
    assert (served["sd"].defaults.steps, served["sd"].defaults.guidance_scale) == (1, 0.0)
    assert models.own(several) is not None and models.own(several).alias == "dit"
    by_id = several.model_copy(update={"model": "stabilityai/sd-turbo"})
    assert models.own(by_id).alias == "sd"
    for bad in ("x", "a=b,a=c", "Bad Alias=m", "=m"):
        with pytest.raises(ValueError, match="DISTILL_MODELS"):
            models.parse(bad)
    with pytest.raises(ValueError, match="neither an alias"):
        models.own(several.model_copy(update={"model": "other/model"}))


def test_local_directories_say_their_family_and_native_size(
    tiny_model: Path, tiny_sd: Path, tiny_dit: Path
) -> None:
    for path, family in ((tiny_model, "sdxl"), (tiny_sd, "sd"), (tiny_dit, "dit")):
        found = models.defaults_for(str(path))
        assert (found.family, found.resolution) == (family, 64)
    assert models.defaults_for(str(tiny_dit)).steps == 25


def test_models_lists_every_alias_with_its_defaults_and_ready_workers(
    deployment: tuple[Settings, TestClient],
) -> None:
    _, client = deployment
    listed = client.get("/v1/models").json()["models"]
    assert [m["alias"] for m in listed] == ["turbo", "sd-turbo", "dit"]
    by_alias = {m["alias"]: m for m in listed}
    assert by_alias["turbo"]["default"] and not by_alias["dit"]["default"]
    assert by_alias["dit"]["conditioning"] == "class"
    assert by_alias["dit"]["pipeline"] == "DiTPipeline"
    assert by_alias["sd-turbo"]["family"] == "sd"
    assert all(m["ready_workers"] == 1 for m in listed)
    ready = client.get("/readyz").json()
    assert ready["models"] == {"turbo": 1, "sd-turbo": 1, "dit": 1}
    assert {w["alias"] for w in ready["workers"]} == {"turbo", "sd-turbo", "dit"}
    text = client.get("/metrics").text
    assert 'distill_model_workers_ready{model="dit"} 1.0' in text
    assert 'distill_model_queue_depth{model="sd-turbo"}' in text


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"labels": ["cat"], "model": "nope"}, "model", "serves: turbo, sd-turbo, dit"),
        ({"labels": ["n01440764", "cat"], "model": "dit"}, "labels", "labels[1] 'cat'"),
        ({"labels": ["crane"], "model": "dit"}, "labels", "n02012849, n03126707"),
        ({"preset": "cifar10", "model": "dit"}, "preset", "'airplane'"),
        (
            {"preset": "imagenette", "model": "dit", "prompt_template": "a {label}"},
            "prompt_template",
            "class-conditional",
        ),
        (
            {
                "preset": "imagenette",
                "model": "dit",
                "prompts": [{"label": "tench", "prompt": "x"}],
            },
            "prompts",
            "takes no prompts",
        ),
        (
            {"preset": "imagenette", "model": "dit", "prompt_strategy": "synonyms"},
            "prompt_strategy",
            "takes no prompts",
        ),
        ({"preset": "imagenette", "model": "dit", "resolution": 512}, "resolution", "64 px"),
        ({"labels": ["cat"], "model": "sd-turbo", "decoder": "tiny"}, "decoder", "SDXL"),
        ({"labels": ["cat"], "steps": 51}, "steps", ""),
        ({"labels": ["cat"], "guidance_scale": 20.5}, "guidance_scale", ""),
        (
            {"labels": ["n01440764"], "model": "dit", "guidance_scale": [1.5, 4.0]},
            "guidance_scale",
            "family dit",
        ),
    ],
)
def test_a_request_a_model_cannot_take_is_a_422_naming_the_field(
    deployment: tuple[Settings, TestClient], body: dict[str, Any], field: str, says: str
) -> None:
    _, client = deployment
    response = client.post("/v1/jobs", json={"ipc": 1, **body})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    text = json.dumps(response.json())
    assert field in text and says in text, text


def test_each_family_runs_a_job_on_its_own_queue_and_the_manifest_says_how(
    deployment: tuple[Settings, TestClient],
) -> None:
    _, client = deployment
    served_by = {w["name"]: w["alias"] for w in client.get("/readyz").json()["workers"]}
    runs = {
        "turbo": {"labels": ["cat", "dog"]},
        "sd-turbo": {"labels": ["cat", "dog"], "model": "sd-turbo", "steps": 2},
        "dit": {"labels": ["n01440764", "golden retriever"], "model": "dit", "steps": 3},
    }
    expected = {
        "turbo": ("sdxl", "StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler", 1, 0.0),
        "sd-turbo": ("sd", "StableDiffusionPipeline", "EulerDiscreteScheduler", 2, 0.0),
        "dit": ("dit", "DiTPipeline", "DDIMScheduler", 3, 4.0),
    }
    for alias, body in runs.items():
        job, archive = run_job(client, {**SMALL, **body})
        assert job["request"]["model"] == alias
        manifest = _manifest(archive)
        model = manifest["model"]
        got = (
            model["family"],
            model["pipeline"],
            model["scheduler"],
            model["num_inference_steps"],
            model["guidance_scale"],
        )
        assert got == expected[alias], (alias, got)
        assert model["alias"] == alias
        assert manifest["counts"]["images"] == 4
        assert served_by[job["worker"]] == alias  # that model's worker took it
        # Same request, same bytes: the second run of each model matches the first.
        _, again = run_job(client, {**SMALL, **body})
        assert again == archive, alias
    dit = _manifest(run_job(client, {**SMALL, **runs["dit"]})[1])
    ids = presets.imagenet_ids(presets.get("imagenet1k").classes[:1])
    assert dit["classes"][0]["prompts"] == [f"ImageNet-1K class {ids[0]} (n01440764)"]
    assert dit["classes"][1]["prompts"] == ["ImageNet-1K class 207 (golden retriever)"]


def test_imagenet_subsets_run_on_the_class_conditional_model(
    deployment: tuple[Settings, TestClient],
) -> None:
    _, client = deployment
    body = {"preset": "imagewoof", "model": "dit", "ipc": 1, "image_size": 16, "steps": 1}
    job, archive = run_job(client, {**body, "augment": {"policy": "none"}})
    manifest = _manifest(archive)
    assert [c["wnid"] for c in manifest["classes"]] == [
        c.wnid for c in presets.get("imagewoof").classes
    ]
    assert job["request"]["guidance_scale"] == 4.0  # the model's default, recorded


def test_a_sharded_job_of_a_second_model_runs_on_its_queue(
    deployment: tuple[Settings, TestClient],
) -> None:
    settings, client = deployment
    served_by = {w["name"]: w["alias"] for w in client.get("/readyz").json()["workers"]}
    body = {**SMALL, "labels": ["cat", "dog"], "ipc": 4, "model": "sd-turbo"}
    with TestClient(create_app(settings.model_copy(update={"shard_images": 4}))) as sharding:
        job, archive = run_job(sharding, body)
    assert job["shards"] is not None and len(job["shards"]) == 2
    assert {served_by[s["worker"]] for s in job["shards"]} == {"sd-turbo"}
    _, whole = run_job(client, body)
    assert archive == whole
