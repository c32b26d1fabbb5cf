"""Bad input is a 4xx problem+json that names the field; nothing is enqueued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings

GOOD: dict[str, Any] = {"labels": ["cat", "dog"], "ipc": 10}


def _with(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no labels", _with(labels=[]), "labels"),
    ("empty label", _with(labels=["cat", " "]), "labels"),
    ("duplicate label", _with(labels=["cat", "Cat"]), "labels"),
    ("control chars", _with(labels=["ca\x00t"]), "labels"),
    ("long label", _with(labels=["x" * 101]), "labels"),
    ("label not a string", _with(labels=["cat", 3]), "labels[1]"),
    ("too many labels", _with(labels=[f"c{i}" for i in range(1001)]), "labels"),
    ("ipc zero", _with(ipc=0), "ipc"),
    ("ipc too big", _with(ipc=1001), "ipc"),
    ("ipc float", _with(ipc=2.5), "ipc"),
    ("ipc string", _with(ipc="ten"), "ipc"),
    ("image too small", _with(image_size=4), "image_size"),
    ("image too big", _with(image_size=1024), "image_size"),
    ("negative seed", _with(seed=-1), "seed"),
    ("resolution not a multiple of 64", _with(resolution=300), "resolution"),
    ("resolution too large", _with(resolution=2048), "resolution"),
    ("template without label", _with(prompt_template="a photo"), "prompt_template"),
    ("template other field", _with(prompt_template="{label} {x}"), "prompt_template"),
    ("template attribute", _with(prompt_template="{label.upper}"), "prompt_template"),
    ("unknown field", _with(colour="red"), "colour"),
    ("unknown policy", _with(augment={"policy": "fancy"}), "augment.policy"),
    ("copies too many", _with(augment={"copies": 21}), "augment.copies"),
    ("copies with none", _with(augment={"policy": "none", "copies": 2}), "augment"),
    ("crop scale", _with(augment={"crop_scale": 0.5}), "augment.crop_scale"),
    (
        "unknown transform",
        _with(augment={"policy": [{"name": "Solarize"}]}),
        "augment.policy[0].name",
    ),
    (
        "unknown param",
        _with(augment={"policy": [{"name": "Rotate", "params": {"angle": 3}}]}),
        "augment.policy[0]",
    ),
    (
        "param out of range",
        _with(augment={"policy": [{"name": "HorizontalFlip", "params": {"p": 2}}]}),
        "augment.policy[0]",
    ),
    (
        "reversed range",
        _with(augment={"policy": [{"name": "RandomGamma", "params": {"gamma_limit": [120, 80]}}]}),
        "augment.policy[0]",
    ),
    ("empty policy", _with(augment={"policy": []}), "augment.policy"),
    ("total too large", _with(labels=[f"c{i}" for i in range(200)], ipc=1000), "body"),
    ("unknown preset", {"preset": "mnist", "ipc": 1}, "preset"),
    ("labels and preset", _with(preset="cifar10"), "body"),
    ("neither labels nor preset", {"ipc": 1}, "body"),
    ("ipc and budget", _with(budget_seconds=60), "body"),
    ("budget too small", {"labels": ["a"], "budget_seconds": 0}, "budget_seconds"),
    ("budget infinite", {"labels": ["a"], "budget_seconds": 1e12}, "budget_seconds"),
    ("unknown format", _with(formats=["png"]), "formats[0]"),
    ("duplicate format", _with(formats=["tensors", "tensors"]), "formats"),
    ("no format", _with(formats=[]), "formats"),
    ("bad template in list", _with(prompt_template=["{label}", "x"]), "prompt_template"),
    ("too many templates", _with(prompt_template=["{label}"] * 17), "prompt_template"),
    ("override unknown class", _with(prompts=[{"label": "zebra", "prompt": "x"}]), "body"),
    ("override extra field", _with(prompts=[{"label": "cat", "p": "x"}]), "prompts[0].prompt"),
]


@pytest.mark.parametrize(("case", "body", "field"), CASES, ids=[c[0] for c in CASES])
def test_invalid_request_names_the_field(
    idle_client: TestClient, case: str, body: dict[str, Any], field: str
) -> None:
    before = idle_client.get("/v1/jobs?limit=200").json()["jobs"]
    response = idle_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert problem["title"] == "Invalid request"
    fields = [e["field"] for e in problem["errors"]]
    assert field in fields, fields
    assert field in problem["detail"]
    assert idle_client.get("/v1/jobs?limit=200").json()["jobs"] == before


def test_param_errors_name_the_parameter(idle_client: TestClient) -> None:
    body = _with(augment={"policy": [{"name": "Rotate", "params": {"limit": 500}}]})
    problem = idle_client.post("/v1/jobs", json=body).json()
    assert "params.limit" in problem["detail"]


def test_nan_and_infinity_are_rejected(idle_client: TestClient) -> None:
    for raw in ("NaN", "Infinity", "-Infinity"):
        body = '{"labels": ["cat"], "ipc": 1, "augment": {"crop_scale": ' + raw + "}}"
        response = idle_client.post(
            "/v1/jobs", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, raw
        assert response.json()["errors"][0]["field"] == "augment.crop_scale"


def test_malformed_json_is_422(idle_client: TestClient) -> None:
    response = idle_client.post(
        "/v1/jobs", content=b'{"labels": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


def test_wrong_content_type_is_415(idle_client: TestClient) -> None:
    response = idle_client.post(
        "/v1/jobs", content=json.dumps(GOOD), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"
    assert "application/json" in response.json()["detail"]


def test_oversized_body_is_413(idle_client: TestClient) -> None:
    body = _with(labels=[f"label number {i} " + "x" * 80 for i in range(3000)])
    response = idle_client.post("/v1/jobs", json=body)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


def test_oversized_chunked_body_is_413(idle_client: TestClient) -> None:
    def chunks() -> Any:
        yield b'{"labels": ['
        for i in range(20_000):
            yield f'"label {i}",'.encode()
        yield b'"end"], "ipc": 1}'

    response = idle_client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_defaults_are_filled_in(idle_client: TestClient) -> None:
    job = idle_client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 3}).json()
    assert job["request"] == {
        # The deployment's default model (DISTILL_MODEL, aliased by its name) and its
        # sampling defaults: SDXL-Turbo's one step without guidance.
        "model": "sdxl-turbo",
        "steps": 1,
        "guidance_scale": 0.0,
        "method": "generate",
        "reference": None,
        "strength": None,
        "labels": ["cat"],
        "preset": None,
        "ipc": 3,
        "budget_seconds": None,
        "image_size": 32,
        "seed": 0,
        "resolution": None,
        "decoder": "vae",
        "prompt_template": "a photo of a {label}",
        "prompts": [],
        "prompt_strategy": "template",
        "augment": {"policy": "paper", "copies": 4, "crop_scale": 1.25},
        "formats": ["imagefolder"],
        "soft_labels": None,
        "select": None,
        "callback_url": None,
    }


def test_unknown_route_and_method_are_problems(idle_client: TestClient) -> None:
    assert idle_client.get("/v2/nothing").headers["content-type"] == "application/problem+json"
    response = idle_client.delete("/v1/jobs")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"


def test_a_tiny_decoder_this_service_lacks_is_422_naming_decoder(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_server.url, tmp_path, queue_name=f"idle-{tmp_path.name}", tiny_decoder="none"
    )
    assert settings.tiny_decoder is None
    with TestClient(create_app(settings)) as client:
        refused = client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 1, "decoder": "tiny"})
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["detail"].startswith("decoder:")
        assert client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 1}).status_code == 202
        unknown = client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 1, "decoder": "big"})
        assert unknown.status_code == 422
        assert unknown.json()["errors"][0]["field"] == "decoder"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ipc", "3"),
        ("ipc", True),
        ("ipc", 3.0),
        ("seed", "7"),
        ("image_size", False),
        ("budget_seconds", "60"),
        ("resolution", "256"),
    ],
)
def test_fields_take_strict_json_types(idle_client: TestClient, field: str, value: Any) -> None:
    body: dict[str, Any] = {"labels": ["cat"], "ipc": 2, field: value}
    if field == "budget_seconds":
        body.pop("ipc")
    response = idle_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field


def test_nested_numbers_are_strict_too(idle_client: TestClient) -> None:
    bad = {"labels": ["cat"], "ipc": 2, "augment": {"copies": "2"}}
    response = idle_client.post("/v1/jobs", json=bad)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "augment.copies"
    good = {"labels": ["cat"], "ipc": 2, "budget_seconds": None, "augment": {"crop_scale": 2}}
    assert idle_client.post("/v1/jobs", json=good).status_code == 202  # an integer is a number
