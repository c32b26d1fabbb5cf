"""The parquet format: Parquet shards in the Hub's layout that ``datasets`` loads with named
labels, written by pyarrow alone exactly as ``datasets`` writes them, split by size, streamed
and byte-stable; through the service, one-piece jobs and budget jobs."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fastapi.testclient import TestClient

from core.presets import ClassInfo
from core.spec import DatasetSpec
from tests.conftest import run_job
from worker import tasks
from worker.outputs import parquet, sink, space
from worker.outputs.archive import ArchiveWriter, decode_png, encode_png, image_name
from worker.outputs.card import features as card_features

# Request order differs from sorted order: the names must follow the class indexes.
LABELS = ["zebra", "apple", "crème brûlée"]
BODY: dict[str, Any] = {
    "labels": LABELS,
    "ipc": 4,
    "image_size": 16,
    "seed": 5,
    "augment": {"policy": "paper", "copies": 1},
    "formats": ["imagefolder", "parquet"],
}
META = ("label_name", "prompt", "seed", "kind", "source", "copy")


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


def _png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode_png(pixels)


def _row(n: int) -> tuple[str, bytes, dict[str, Any]]:
    """Image ``n`` of a made-up job: class n // 4, every odd image a copy."""
    label = n // 4
    meta: dict[str, Any] = {
        "label": label,
        "label_name": LABELS[label],
        "prompt": f"a photo of a {LABELS[label]}",
        "seed": n * 10**17,  # beyond 32 bits: int64 all the way
        "kind": "augmented" if n % 2 else "generated",
        "source": image_name(label, LABELS[label], n - 1) if n % 2 else None,
    }
    if n % 2:
        meta["copy"] = 1
    return image_name(label, LABELS[label], n), _png(n), meta


def _fill(writer: parquet.ShardWriter, count: int) -> list[tuple[str, bytes, dict[str, Any]]]:
    rows = [_row(n) for n in range(count)]
    for name, png, meta in rows:
        writer.add(name, png, meta)
    return rows


def _features(*, with_copy: bool = True) -> Any:
    from datasets import ClassLabel, Features, Image, Value

    columns: dict[str, Any] = {"image": Image(), "label": ClassLabel(names=LABELS)}
    for name, dtype in parquet.columns(with_copy=with_copy):
        columns[name] = Value(dtype)
    return Features(columns)


# ---- the writer on its own ------------------------------------------------------------------


@pytest.mark.parametrize("with_copy", [True, False])
def test_schema_metadata_is_what_datasets_writes(with_copy: bool) -> None:
    ours = parquet.schema(LABELS, with_copy=with_copy)
    theirs = _features(with_copy=with_copy).arrow_schema
    assert ours.metadata == theirs.metadata
    assert ours.equals(theirs, check_metadata=True)
    features = json.loads(ours.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": LABELS, "_type": "ClassLabel"}
    assert ("copy" in features) is with_copy


def test_a_file_is_byte_for_byte_what_datasets_to_parquet_writes(tmp_path: Path) -> None:
    from datasets import Dataset

    writer = parquet.ShardWriter(names=LABELS, with_copy=True, directory=tmp_path, row_group_rows=5)
    rows = _fill(writer, 12)
    (ours,) = writer.write_to(tmp_path / "ours")
    table = {
        "image": [{"bytes": png, "path": name} for name, png, _ in rows],
        "label": [meta["label"] for _, _, meta in rows],
        **{column: [meta.get(column) for _, _, meta in rows] for column in META},
    }
    theirs = tmp_path / "theirs.parquet"
    Dataset.from_dict(table, features=_features()).to_parquet(str(theirs), batch_size=5)
    assert ours.name == "train-00000-of-00001.parquet"
    assert ours.read_bytes() == theirs.read_bytes()
    meta = pq.ParquetFile(ours).metadata
    assert meta.num_rows == 12 and meta.num_row_groups == 3
    assert meta.created_by == f"parquet-cpp-arrow version {pa.__version__}"


def test_shards_split_by_size_and_read_back_in_order(tmp_path: Path) -> None:
    # A row counts 330 to 410 bytes: row groups of 2 rows (705 to 785 bytes), 3 to a shard.
    writer = parquet.ShardWriter(
        names=LABELS, with_copy=True, directory=tmp_path, max_bytes=2300, row_group_rows=2
    )
    rows = _fill(writer, 12)
    paths = writer.write_to(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert writer.description()["shards"] == [f"data/{p.name}" for p in paths]
    files = [pq.ParquetFile(p) for p in paths]
    assert [f.metadata.num_row_groups for f in files] == [3, 3]
    table = pa.concat_tables(pq.read_table(p) for p in paths)
    assert table.column("image").to_pylist() == [{"bytes": png, "path": n} for n, png, _ in rows]
    assert table.column("seed").to_pylist() == [meta["seed"] for _, _, meta in rows]
    assert table.column("copy").to_pylist() == [meta.get("copy") for _, _, meta in rows]
    # Anonymous temporary files: nothing but the copies is left in the directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_row_groups_close_at_the_byte_limit_too(tmp_path: Path) -> None:
    # Rows of 330 to 410 bytes: two stay under 1000 bytes, a third takes the group past it.
    writer = parquet.ShardWriter(names=LABELS, with_copy=True, row_group_bytes=1000)
    _fill(writer, 12)
    (path,) = writer.write_to(tmp_path)
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 3, 3]


def test_same_rows_same_bytes(tmp_path: Path) -> None:
    copies = []
    for name in ("a", "b"):
        writer = parquet.ShardWriter(names=LABELS, with_copy=True, max_bytes=2300, row_group_rows=2)
        _fill(writer, 12)
        copies.append([p.read_bytes() for p in writer.write_to(tmp_path / name)])
    assert copies[0] == copies[1] and len(copies[0]) == 2


def test_a_label_outside_the_classes_is_refused() -> None:
    writer = parquet.ShardWriter(names=LABELS, with_copy=False)
    with pytest.raises(ValueError, match="label 3"):
        writer.add("x.png", b"png", {"label": 3})
    writer.close()


def test_copy_column_follows_the_request() -> None:
    def spec(**extra: Any) -> DatasetSpec:
        return DatasetSpec.model_validate({"labels": ["a"], "formats": ["parquet"], **extra})

    assert parquet.has_copies(spec(ipc=2))
    assert not parquet.has_copies(spec(ipc=1))  # no room for a copy
    assert not parquet.has_copies(spec(ipc=5, augment={"policy": "none"}))
    assert parquet.has_copies(spec(budget_seconds=5))


def test_estimate_counts_the_shards_and_one_temporary_copy() -> None:
    base = {"labels": ["a", "b"], "ipc": 10, "image_size": 32}
    folder = space.estimate_bytes(DatasetSpec.model_validate({**base, "formats": ["imagefolder"]}))
    both = space.estimate_bytes(
        DatasetSpec.model_validate({**base, "formats": ["imagefolder", "parquet"]})
    )
    assert both - folder == 2 * 20 * (32 * 32 * 3 + parquet.OVERHEAD_BYTES)


def test_assembly_from_parts_fills_the_shards_without_imagefolder(tmp_path: Path) -> None:
    """``_copy_part`` hands each part's PNG and metadata line to the Parquet shards."""
    cls = ClassInfo(index=0, label="cat")
    part = tmp_path / "part.zip"
    with ArchiveWriter(final=part, partial=tmp_path / ".part.zip.part") as writer:
        for n in range(3):
            meta = {"label": 0, "label_name": "cat", "prompt": "a cat", "seed": n}
            writer.add_png(image_name(0, "cat", n), _png(n), **meta, kind="generated", source=None)
        writer.commit({})
    spec = DatasetSpec.model_validate(
        {"labels": ["cat"], "ipc": 3, "augment": {"policy": "none"}, "formats": ["parquet"]}
    )
    final = tmp_path / "job.zip"
    with ArchiveWriter(final=final, partial=tmp_path / ".job.zip.part") as writer:
        outputs = sink.Outputs(spec=spec, writer=writer)
        tasks._copy_part(part, outputs, (cls,))
        entry = outputs.parquet_entry()
        writer.commit({"formats": entry})
    assert entry["parquet"]["shards"] == ["data/train-00000-of-00001.parquet"]
    assert entry["parquet"]["rows"] == 3
    with zipfile.ZipFile(final) as zf:
        assert zf.namelist() == ["data/train-00000-of-00001.parquet", "manifest.json"]
        info = zf.getinfo("data/train-00000-of-00001.parquet")
        assert info.compress_type == zipfile.ZIP_STORED
        table = pq.read_table(io.BytesIO(zf.read(info.filename)))
    assert table.column_names == [
        "image",
        "label",
        "label_name",
        "prompt",
        "seed",
        "kind",
        "source",
    ]
    assert table.to_pylist()[1] == {
        "image": {"bytes": _png(1), "path": "000_cat/000_00001.png"},
        "label": 0,
        "label_name": "cat",
        "prompt": "a cat",
        "seed": 1,
        "kind": "generated",
        "source": None,
    }


# ---- real jobs through the service ----------------------------------------------------------


def _extract(data: bytes, folder: Path) -> tuple[zipfile.ZipFile, list[dict[str, Any]]]:
    zf = zipfile.ZipFile(io.BytesIO(data))
    zf.extractall(folder)
    if "train/metadata.jsonl" not in zf.namelist():
        return zf, []
    lines = zf.read("train/metadata.jsonl").decode().splitlines()
    return zf, [json.loads(line) for line in lines]


def _check_loaded(ds: Any, rows: list[dict[str, Any]], zf: zipfile.ZipFile) -> None:
    """``ds`` has the archive's rows: ClassLabel of LABELS, the train/ pixels, the metadata."""
    from datasets import ClassLabel, Image

    assert isinstance(ds.features["label"], ClassLabel), ds.features
    assert ds.features["label"].names == LABELS
    assert isinstance(ds.features["image"], Image)
    assert ds.num_rows == len(rows) == 12
    assert ds["label"] == [row["label"] for row in rows]
    for column in META:
        assert ds[column] == [row.get(column) for row in rows], column
    for index in (0, 5, 11):
        expected = decode_png(zf.read(f"train/{rows[index]['file_name']}"))
        assert np.array_equal(np.asarray(ds[index]["image"].convert("RGB")), expected)


def test_job_parquet_loads_with_class_names_from_the_files_the_folder_and_the_zip(
    client: TestClient,
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = _offline(monkeypatch, tmp_path)
    from datasets import load_dataset
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard

    _, data = run_job(client, BODY)
    folder = tmp_path / "dataset"
    zf, rows = _extract(data, folder)
    names = [n for n in zf.namelist() if n.startswith("data/")]
    assert names == ["data/train-00000-of-00001.parquet"]
    assert zf.getinfo(names[0]).compress_type == zipfile.ZIP_STORED

    # pyarrow alone: the features are in the schema, the PNGs are train/'s.
    table = pq.read_table(folder / names[0])
    assert table.schema.metadata == parquet.schema(LABELS, with_copy=True).metadata
    assert [r["image"]["bytes"] for r in table.to_pylist()] == [
        zf.read(f"train/{row['file_name']}") for row in rows
    ]
    assert table.column("image").to_pylist()[3]["path"] == rows[3]["file_name"]

    files = str(folder / "data" / "train-*.parquet")
    from_files = load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    _check_loaded(from_files, rows, zf)
    print("load_dataset('parquet', data_files=...):", from_files.features, from_files.num_rows)
    # The folder: the card's config is the Parquet shards.
    from_folder = load_dataset(str(folder), split="train", cache_dir=cache)
    _check_loaded(from_folder, rows, zf)
    assert from_folder.info.builder_name == "parquet"
    # The card's features still serve the imagefolder builder on train/, as the card shows.
    (tmp_path / "dataset.zip").write_bytes(data)
    card = DatasetCard(zf.read("README.md").decode("utf-8"))
    features = DatasetInfosDict.from_dataset_card_data(card.data)["default"].features
    for where in (
        {"data_files": str(tmp_path / "dataset.zip")},
        {"data_dir": str(folder / "train")},
    ):
        tree = load_dataset(
            "imagefolder", split="train", features=features, cache_dir=cache, **where
        )
        _check_loaded(tree, rows, zf)

    # The zip itself, as the card shows (fsspec's chained URL; datasets treats it as remote).
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    url = f"zip://data/train-*.parquet::{tmp_path / 'dataset.zip'}"
    from_zip = load_dataset("parquet", data_files=url, split="train", cache_dir=cache)
    _check_loaded(from_zip, rows, zf)

    described = json.loads(zf.read("manifest.json"))
    entry = described["formats"]["parquet"]
    assert list(described["formats"]) == ["imagefolder", "parquet"]
    assert entry["shards"] == names and entry["rows"] == 12
    assert entry["columns"] == table.column_names
    assert described["versions"]["pyarrow"] == pa.__version__
    text = zf.read("README.md").decode()
    header = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    (config,) = header["configs"]
    assert config["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    # The Parquet columns' features are those the imagefolder tree declares.
    assert config["features"] == header["dataset_info"]["features"] == card_features(described)
    assert 'load_dataset("parquet", data_files="dataset/data/train-*.parquet"' in text

    _, again = run_job(client, BODY)
    second = zipfile.ZipFile(io.BytesIO(again))
    assert second.read(names[0]) == zf.read(names[0])
    assert again == data


def test_parquet_alone_has_no_train_tree_and_loads_from_the_folder(
    client: TestClient,
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = _offline(monkeypatch, tmp_path)
    from datasets import load_dataset

    body = {**BODY, "labels": ["b", "a"], "ipc": 2, "augment": {"policy": "none"}}
    _, data = run_job(client, {**body, "formats": ["parquet"]})
    folder = tmp_path / "dataset"
    zf, _ = _extract(data, folder)
    assert not [n for n in zf.namelist() if n.startswith("train/")]
    header = yaml.safe_load(zf.read("README.md").decode()[4:].split("\n---\n", 1)[0])
    assert [c["config_name"] for c in header["configs"]] == ["default"]
    ds = load_dataset(str(folder), split="train", cache_dir=cache)
    assert ds.features["label"].names == ["b", "a"]
    assert "copy" not in ds.features and ds.num_rows == 4
    assert ds["label"] == [0, 0, 1, 1] and ds["kind"] == ["generated"] * 4
    # The same images as the imagefolder format gives for the same request.
    _, tree = run_job(client, {**body, "formats": ["imagefolder"]})
    pngs = zipfile.ZipFile(io.BytesIO(tree))
    names = sorted(n for n in pngs.namelist() if n.endswith(".png") and n.startswith("train/"))
    table = pq.read_table(folder / "data" / "train-00000-of-00001.parquet")
    assert [r["bytes"] for r in table.column("image").to_pylist()] == [pngs.read(n) for n in names]


def test_budget_job_rows_come_round_by_round(
    client: TestClient, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    body = {
        "labels": ["cat", "dog"],
        "budget_seconds": 1,
        "image_size": 8,
        "augment": {"policy": "paper", "copies": 1},
        "formats": ["imagefolder", "parquet"],
    }
    _, data = run_job(client, body)
    zf, rows = _extract(data, tmp_path)
    table = pa.concat_tables(
        pq.read_table(tmp_path / n) for n in zf.namelist() if n.startswith("data/")
    )
    assert table.column("label").to_pylist() == [row["label"] for row in rows]
    assert table.column("label").to_pylist()[:4] == [0, 0, 1, 1]  # round 1: cat, its copy, dog
    paths = [image["path"] for image in table.column("image").to_pylist()]
    assert paths == [row["file_name"] for row in rows]
