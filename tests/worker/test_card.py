"""The archive's dataset card (``README.md``): real archives from the tiny model, loaded with
the real ``datasets`` library, offline."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.conftest import run_job
from worker.outputs import card, card_facts

# Request order differs from sorted order (apple < crème brûlée < zebra): the names must follow
# the class indexes, not the alphabet. The paper policy's copies give the metadata a `copy`
# column; tensors give the card a torch.load section.
LABELS = ["zebra", "apple", "crème brûlée"]
BODY = {
    "labels": LABELS,
    "ipc": 4,
    "image_size": 8,
    "seed": 7,
    "formats": ["imagefolder", "tensors"],
}


def _header(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    data = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    assert isinstance(data, dict)
    return data


def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """No network and a private cache, however early ``datasets`` was imported."""
    cache = tmp_path / "hf-cache"
    for name, value in {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_DATASETS_CACHE": str(cache),
    }.items():
        monkeypatch.setenv(name, value)
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return str(cache)


@pytest.fixture(scope="module")
def archives(client: TestClient, worker: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """The same request twice."""
    return run_job(client, BODY)[1], run_job(client, BODY)[1]


@pytest.fixture(scope="module")
def client(stack_settings: Any) -> Any:
    # Module-scoped twin of the conftest fixture, so the two jobs run once for all tests here.
    from service.app import create_app

    with TestClient(create_app(stack_settings)) as test_client:
        yield test_client


def test_same_request_same_card_and_archive(archives: tuple[bytes, bytes]) -> None:
    first, second = archives
    assert first == second
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert "README.md" in names and "manifest.json" in names


def test_card_header_parses_and_body_names_model_and_licence(
    archives: tuple[bytes, bytes],
) -> None:
    zf = zipfile.ZipFile(io.BytesIO(archives[0]))
    text = zf.read("README.md").decode("utf-8")
    described = json.loads(zf.read("manifest.json"))
    assert text.encode() == card.render(described)  # the card is the manifest's, nothing else

    header = _header(text)
    assert header["license"] == "unknown"  # the tiny model's directory states none
    assert header["task_categories"] == ["image-classification"]
    info = header["dataset_info"]
    names = info["features"][1]["dtype"]["class_label"]["names"]
    assert [names[str(i)] for i in range(len(names))] == LABELS
    assert info["splits"] == [{"name": "train", "num_bytes": 0, "num_examples": 12}]
    assert header["configs"][0]["data_files"] == [{"split": "train", "path": "train/**"}]
    assert header["configs"][0]["features"] == info["features"]

    # The declared columns are exactly those of metadata.jsonl (file_name is the image).
    rows = [json.loads(line) for line in zf.read("train/metadata.jsonl").decode().splitlines()]
    keys: dict[str, None] = {}
    for row in rows:
        keys |= dict.fromkeys(row)
    declared = [f["name"] for f in info["features"]]
    assert declared == ["image", *(k for k in keys if k != "file_name")]

    body = text.split("\n---\n", 1)[1]
    model = described["model"]["model"]
    assert model and f"`{model}`" in body
    assert "whose licence is unknown" in body
    assert card_facts.METHOD in body
    assert "| 3 | 4 | 12 | 3 | 9 |" in body  # classes, per class, images, generated, augmented
    assert "crème brûlée" in body and "a photo of a crème brûlée" in body
    assert 'torch.load("dataset/tensors.pt", weights_only=True)' in body
    assert 'load_dataset("imagefolder", data_files="dataset.zip"' in body
    assert f"| seed | {BODY['seed']} |" in body


def test_datasets_loads_the_zip_and_the_folder_with_class_names(
    archives: tuple[bytes, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _offline(monkeypatch, tmp_path)
    from datasets import ClassLabel, Image, load_dataset
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard

    data = archives[0]
    zip_path = tmp_path / "dataset.zip"
    zip_path.write_bytes(data)
    folder = tmp_path / "dataset"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(folder)
        rows = [json.loads(x) for x in zf.read("train/metadata.jsonl").decode().splitlines()]
    labels = [row["label"] for row in rows]

    def check(ds: Any) -> None:
        assert isinstance(ds.features["label"], ClassLabel), ds.features
        assert ds.features["label"].names == LABELS
        assert isinstance(ds.features["image"], Image)
        assert ds.num_rows == len(rows) == 12
        assert ds["label"] == labels
        assert ds.features["label"].int2str(ds[4]["label"]) == rows[4]["label_name"] == "apple"

    # 1. The extracted folder: load_dataset reads the card's configs and features.
    from_folder = load_dataset(str(folder), split="train", cache_dir=cache)
    check(from_folder)
    print("load_dataset(folder):", from_folder.features, from_folder.num_rows)
    first = from_folder[0]
    assert first["image"].size == (8, 8) and first["kind"] == "generated"
    assert from_folder[1]["copy"] == 1 and from_folder[1]["source"] == rows[0]["file_name"]

    # 2. The zip itself and the folder through the imagefolder builder, with the card's
    # features, exactly as the card's body shows.
    with zipfile.ZipFile(zip_path) as zf:
        dataset_card = DatasetCard(zf.read("README.md").decode("utf-8"))
    features = DatasetInfosDict.from_dataset_card_data(dataset_card.data)["default"].features
    from_zip = load_dataset(
        "imagefolder", data_files=str(zip_path), split="train", features=features, cache_dir=cache
    )
    check(from_zip)
    print("load_dataset('imagefolder', data_files=zip):", from_zip.features, from_zip.num_rows)
    from_dir = load_dataset(
        "imagefolder", data_dir=str(folder), split="train", features=features, cache_dir=cache
    )
    check(from_dir)

    # Without the card's features the builder reads `label` as metadata.jsonl's integer.
    bare = load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=cache)
    assert bare.num_rows == 12 and not isinstance(bare.features["label"], ClassLabel)


def _manifest(archives: tuple[bytes, bytes]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        zipfile.ZipFile(io.BytesIO(archives[0])).read("manifest.json")
    )
    return loaded


def test_known_models_carry_their_stated_licence(archives: tuple[bytes, bytes]) -> None:
    described = _manifest(archives)
    described["model"]["model"] = "stabilityai/sdxl-turbo"
    text = card.render(described).decode()
    header = _header(text)
    assert header["license"] == "other"
    assert header["license_name"] == "sai-nc-community"
    assert header["license_link"].endswith("/stabilityai/sdxl-turbo/blob/main/LICENSE.md")
    assert "Stability AI Non-Commercial Research Community License" in text
    assert "`stabilityai/sdxl-turbo`" in text

    assert card_facts.model_license("stabilityai/sd-turbo").name == "sai-nc-community"
    assert card_facts.model_license("madebyollin/taesdxl").id == "mit"
    assert card_facts.model_license("facebook/DiT-XL-2-256").id == "cc-by-nc-4.0"
    assert card_facts.model_license("someone/unheard-of").id == "unknown"


def test_local_model_directory_licence(tmp_path: Path) -> None:
    stated = tmp_path / "stated"
    stated.mkdir()
    (stated / "README.md").write_text(
        "---\nlicense: openrail++\nlicense_name: x\n---\n# a model\n", encoding="utf-8"
    )
    assert card_facts.model_license(str(stated)).id == "openrail++"
    silent = tmp_path / "silent"
    silent.mkdir()
    (silent / "README.md").write_text("# no header\n", encoding="utf-8")
    assert card_facts.model_license(str(silent)) == card_facts.UNKNOWN
    snapshot = tmp_path / "models--stabilityai--sdxl-turbo" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert card_facts.model_license(str(snapshot)).name == "sai-nc-community"


def test_repeated_preset_labels_get_unique_class_names() -> None:
    classes = [
        {"index": 0, "label": "crane", "wnid": "n02012849", "folder": "train/000_crane"},
        {"index": 1, "label": "cat", "wnid": "n1", "folder": "train/001_cat"},
        {"index": 2, "label": "crane", "wnid": "n03126707", "folder": "train/002_crane"},
    ]
    assert card_facts.class_names(classes) == ["crane (n02012849)", "cat", "crane (n03126707)"]


def test_hostile_labels_stay_data(archives: tuple[bytes, bytes]) -> None:
    described = copy.deepcopy(_manifest(archives))
    hostile = ["yes", "1.5", "a|b", "---", "x: y", "`tick`", "猫 🐱", "null"]
    described["classes"] = [
        {**described["classes"][0], "index": i, "label": label, "prompts": [f"a {label}"]}
        for i, label in enumerate(hostile)
    ]
    text = card.render(described).decode()
    names = _header(text)["dataset_info"]["features"][1]["dtype"]["class_label"]["names"]
    assert [names[str(i)] for i in range(len(hostile))] == hostile
    assert "| a\\|b |" in text


def test_archive_without_imagefolder_turns_the_viewer_off(archives: tuple[bytes, bytes]) -> None:
    described = _manifest(archives)
    described["formats"] = {k: v for k, v in described["formats"].items() if k != "imagefolder"}
    text = card.render(described).decode()
    header = _header(text)
    assert header["viewer"] is False and "configs" not in header
    assert "ImageFolder" not in text and "torch.load" in text


def test_archive_without_copies_declares_no_copy_column(
    client: TestClient,
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = _offline(monkeypatch, tmp_path)
    from datasets import load_dataset

    body = {"labels": ["b", "a"], "ipc": 2, "image_size": 8, "augment": {"policy": "none"}}
    _, data = run_job(client, body)
    folder = tmp_path / "dataset"
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(folder)
    ds = load_dataset(str(folder), split="train", cache_dir=cache)
    assert ds.features["label"].names == ["b", "a"]
    assert "copy" not in ds.features and ds.num_rows == 4
    assert ds["source"] == [None] * 4 and ds["label"] == [0, 0, 1, 1]
