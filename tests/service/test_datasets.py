"""Datasets a researcher can trust, checked on real archives from the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import run_job


def _zip(data: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(data))


def _rows(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    return [json.loads(x) for x in zf.read("train/metadata.jsonl").decode().splitlines()]


def test_presets_endpoint_lists_and_details(client: TestClient) -> None:
    listed = client.get("/v1/presets").json()["presets"]
    by_name = {p["name"]: p for p in listed}
    assert by_name["cifar100"]["num_classes"] == 100
    assert by_name["cifar100"]["first_class"] == "apple"
    assert by_name["tinyimagenet"]["image_size"] == 64
    detail = client.get("/v1/presets/imagenet1k").json()
    assert detail["classes"][0] == {
        "index": 0,
        "label": "tench",
        "wnid": "n01440764",
        "synonyms": ["tench", "Tinca tinca"],
    }
    missing = client.get("/v1/presets/mnist")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


def test_cifar100_preset_job_labels_every_class_by_its_standard_index(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    job, data = run_job(client, {"preset": "cifar100", "ipc": 1, "image_size": 8})
    assert job["request"]["image_size"] == 8
    zf = _zip(data)
    rows = _rows(zf)
    assert len(rows) == 100
    names = [row["label_name"] for row in rows]
    assert names[:2] == ["apple", "aquarium_fish"] and names[-1] == "worm"
    assert [row["label"] for row in rows] == list(range(100))
    for row in rows:
        assert row["file_name"].startswith(f"{row['label']:03d}_")
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["preset"]["name"] == "cifar100"
    assert manifest["preset"]["mean"] == [0.5071, 0.4866, 0.4409]
    assert manifest["classes"][1]["prompts"] == ["a photo of a aquarium fish"]
    assert manifest["classes"][99] | {"prompts": None} == {
        "index": 99,
        "label": "worm",
        "wnid": None,
        "folder": "train/099_worm",
        "prompts": None,
        "images": 1,
    }


def test_wordnet_preset_records_wnids(client: TestClient, worker: subprocess.Popen[bytes]) -> None:
    _, data = run_job(
        client, {"preset": "tinyimagenet", "ipc": 1, "image_size": 8, "formats": ["tensors"]}
    )
    zf = _zip(data)
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["classes"][0]["wnid"] == "n01443537"
    assert manifest["classes"][0]["label"] == "goldfish"
    assert manifest["classes"][0]["prompts"] == ["a photo of a goldfish"]
    assert not [n for n in zf.namelist() if n.startswith("train/")]
    assert {"tensors.pt", "normalized.pt", "manifest.json", "preview.png", "README.md"} == set(
        zf.namelist()
    )


def test_tensors_load_back_and_match_the_pngs(
    client: TestClient, worker: subprocess.Popen[bytes], tmp_path: Any
) -> None:
    body = {"preset": "cifar10", "ipc": 3, "image_size": 16, "formats": ["imagefolder", "tensors"]}
    _, data = run_job(client, body)
    zf = _zip(data)
    (tmp_path / "t.pt").write_bytes(zf.read("tensors.pt"))
    (tmp_path / "n.pt").write_bytes(zf.read("normalized.pt"))
    tensors = torch.load(tmp_path / "t.pt", weights_only=True)
    normalized = torch.load(tmp_path / "n.pt", weights_only=True)

    assert tensors["images"].dtype == torch.uint8 and tensors["images"].shape == (30, 3, 16, 16)
    assert tensors["labels"].dtype == torch.int64
    assert tensors["labels"].tolist() == [i for i in range(10) for _ in range(3)]
    assert tensors["classes"][0] == "airplane" and len(tensors["classes"]) == 10

    rows = _rows(zf)
    ordered = sorted(rows, key=lambda r: r["file_name"])
    for position, row in enumerate(ordered):
        png = np.asarray(Image.open(io.BytesIO(zf.read("train/" + row["file_name"]))))
        assert np.array_equal(tensors["images"][position].permute(1, 2, 0).numpy(), png)
        assert tensors["labels"][position] == row["label"]

    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    expected = (tensors["images"].float() / 255 - mean) / std
    assert normalized["images"].dtype == torch.float32
    assert torch.allclose(normalized["images"], expected, atol=1e-6)
    assert torch.equal(normalized["labels"], tensors["labels"])
    formats = json.loads(zf.read("manifest.json"))["formats"]
    assert "(x / 255 - mean) / std" in formats["normalized.pt"]["images"]
    assert formats["normalized.pt"]["std"] == [0.2023, 0.1994, 0.201]


def test_labels_jobs_get_tensors_without_normalized_file(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    _, data = run_job(
        client, {"labels": ["zebra", "apple"], "ipc": 2, "formats": ["tensors", "imagefolder"]}
    )
    names = set(_zip(data).namelist())
    assert "tensors.pt" in names and "normalized.pt" not in names


def test_identical_requests_give_identical_archives_byte_for_byte(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {
        "preset": "cifar10",
        "ipc": 5,
        "image_size": 16,
        "seed": 3,
        "formats": ["imagefolder", "tensors"],
    }
    first_job, first = run_job(client, body)
    second_job, second = run_job(client, body)
    assert first_job["id"] != second_job["id"]
    assert first == second
    assert first_job["archive"]["sha256"] == hashlib.sha256(second).hexdigest()


def test_manifest_request_reproduces_the_images(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {
        "labels": ["cat", "dog"],
        "ipc": 4,
        "prompt_template": ["a photo of a {label}", "a painting of a {label}"],
        "prompts": [{"label": "dog", "prompt": "a photo of a small dog"}],
        "augment": {"policy": [{"name": "HorizontalFlip", "params": {"p": 1}}], "copies": 1},
    }
    _, original = run_job(client, body)
    manifest = json.loads(_zip(original).read("manifest.json"))
    assert manifest["model"]["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert manifest["model"]["num_inference_steps"] == 1
    assert manifest["model"]["guidance_scale"] == 0.0
    assert len(manifest["model"]["local_fingerprint"]) == 64
    assert manifest["sampling"]["augment_steps"] == [
        {"name": "HorizontalFlip", "params": {"p": 1.0}}
    ]
    _, again = run_job(client, manifest["request"])
    assert original == again
    rows = _rows(_zip(original))
    assert {r["prompt"] for r in rows if r["label"] == 0} == {
        "a photo of a cat",
        "a painting of a cat",
    }
    assert {r["prompt"] for r in rows if r["label"] == 1} == {"a photo of a small dog"}


def test_budget_job_balances_classes_and_reports_reached_ipc(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {"preset": "cifar10", "budget_seconds": 2, "image_size": 8, "augment": {"copies": 1}}
    job, data = run_job(client, body)
    zf = _zip(data)
    manifest = json.loads(zf.read("manifest.json"))
    per_class = [c["images"] for c in manifest["classes"]]
    reached = job["progress"]["ipc_reached"]
    assert reached == min(per_class) >= 2
    assert max(per_class) - min(per_class) <= 2  # within one sampled image (+ its copy)
    assert job["progress"]["total"] == sum(per_class) == len(_rows(zf))
    budget = manifest["budget"]
    assert budget["seconds"] == 2 and budget["ipc_reached"] == reached
    assert budget["model_load_counted"] is False and budget["model_load_seconds"] > 0
    print(f"budget 2 s: {sum(per_class)} images, ipc {reached}, used {budget['seconds_used']} s")


def test_generation_resolution_is_a_request_option(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    body = {"labels": ["cat"], "ipc": 2, "image_size": 16, "augment": {"policy": "none"}}
    _, native = run_job(client, body)
    _, larger = run_job(client, {**body, "resolution": 128})
    manifest = json.loads(_zip(larger).read("manifest.json"))
    assert manifest["sampling"]["resolution"] == 128
    assert json.loads(_zip(native).read("manifest.json"))["sampling"]["resolution"] == 64
    first = "train/000_cat/000_00000.png"
    assert _zip(native).read(first) != _zip(larger).read(first)


def test_the_challenge_file_is_what_its_evaluator_loads(
    client: TestClient, worker: subprocess.Popen[bytes], tmp_path: Any
) -> None:
    """Do to ``cifar100.pt`` what the ECCV 2024 DD Challenge's evaluate.py does before it
    trains: torch.load the path, assert N = 10 x 100, 3 x 32 x 32, labels by position."""
    body = {"preset": "cifar100", "ipc": 10, "formats": ["imagefolder", "challenge"]}
    job, data = run_job(client, body)
    zf = _zip(data)
    path = tmp_path / "cifar100.pt"
    path.write_bytes(zf.read("cifar100.pt"))
    loaded = torch.load(path)  # as the script does: no map_location, default weights_only
    assert isinstance(loaded, torch.Tensor) and loaded.dtype == torch.float32
    num_classes = 100
    assert loaded.shape[0] == 10 * num_classes
    assert loaded.shape[1] == 3 and loaded.shape[2] == 32 and loaded.shape[3] == 32
    labels = torch.arange(num_classes).repeat_interleave(10)  # 10 of class 0, then class 1...
    # Class-major in the preset's order, normalized with the challenge's constants: image k
    # is the k-th PNG of the ImageFolder tree, whose folder is its label.
    mean = torch.tensor([0.5071, 0.4866, 0.4409]).view(3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    rows = _rows(zf)
    by_class = sorted(rows, key=lambda r: (r["label"], r["file_name"]))
    for k in (0, 9, 10, 517, 999):
        row = by_class[k]
        assert row["label"] == int(labels[k])
        png = np.array(Image.open(io.BytesIO(zf.read(f"train/{row['file_name']}"))))
        expected = (torch.from_numpy(png).permute(2, 0, 1).float() / 255 - mean) / std
        assert torch.allclose(loaded[k], expected, atol=1e-5), k
    manifest = json.loads(zf.read("manifest.json"))
    entry = manifest["formats"]["cifar100.pt"]
    assert entry["mean"] == [0.5071, 0.4866, 0.4409] and entry["warnings"] == []
    assert job["progress"]["written"] == 1000


def test_the_challenge_format_warns_off_its_ipc_and_refuses_other_datasets(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    _, data = run_job(client, {"preset": "cifar100", "ipc": 1, "formats": ["challenge"]})
    zf = _zip(data)
    assert torch.load(io.BytesIO(zf.read("cifar100.pt"))).shape == (100, 3, 32, 32)
    warnings = json.loads(zf.read("manifest.json"))["formats"]["cifar100.pt"]["warnings"]
    assert len(warnings) == 1 and "10 images per class" in warnings[0]
    for other in ({"preset": "cifar10", "ipc": 1}, {"labels": ["cat"], "ipc": 1}):
        refused = client.post("/v1/jobs", json={**other, "formats": ["challenge"]})
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["field"] == "formats"
