"""The webdataset format: tar shards that the real ``webdataset`` and Hugging Face ``datasets``
loaders read, with the ImageFolder tree's PNGs and labels, streamed, rolled over and
byte-stable."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from fastapi.testclient import TestClient

from core.presets import ClassInfo
from core.spec import DatasetSpec
from tests.conftest import run_job
from worker import postprocess, tasks
from worker.outputs import sink, space
from worker.outputs.archive import ArchiveWriter, encode_png, image_name
from worker.outputs.webdataset import ShardWriter, encode_sample, sample_key

BODY: dict[str, Any] = {
    "labels": ["cat", "dog", "fish"],
    "ipc": 4,
    "image_size": 16,
    "seed": 3,
    "augment": {"policy": "paper", "copies": 1},
    "formats": ["imagefolder", "webdataset"],
}


def _rows(zf: zipfile.ZipFile) -> list[dict[str, Any]]:
    return [json.loads(x) for x in zf.read("train/metadata.jsonl").decode().splitlines()]


def _extract_tars(zf: zipfile.ZipFile, directory: Path) -> list[Path]:
    names = sorted(n for n in zf.namelist() if n.startswith("webdataset/"))
    paths = []
    for name in names:
        path = directory / Path(name).name
        path.write_bytes(zf.read(name))
        paths.append(path)
    return paths


def _read(paths: list[Path]) -> list[dict[str, Any]]:
    """Every sample through the real webdataset loader: PNG kept as bytes, .cls and .json
    decoded by its default handlers."""
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode()
    return list(dataset)


def _png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode_png(pixels)


# ---- the writer on its own ------------------------------------------------------------------


def _fill(writer: ShardWriter, count: int) -> list[str]:
    keys = []
    for n in range(count):
        key = sample_key(n // 3, n % 3)
        row = {"file_name": f"{key}.png", "label": n // 3, "label_name": f"c{n // 3}", "seed": n}
        writer.add(key, encode_sample(_png(n), row))
        keys.append(key)
    return keys


def test_shards_roll_over_at_the_sample_limit_and_read_back_in_order(tmp_path: Path) -> None:
    writer = ShardWriter(directory=tmp_path, max_samples=3)
    keys = _fill(writer, 7)
    assert writer.names == [f"webdataset/train-00000{i}.tar" for i in range(3)]
    paths = writer.write_to(tmp_path)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    per_shard = [len(_read([p])) for p in paths]
    assert per_shard == [3, 3, 1]
    samples = _read(paths)
    assert [s["__key__"] for s in samples] == keys == sorted(keys)
    assert [s["cls"] for s in samples] == [n // 3 for n in range(7)]
    assert [s["json"]["seed"] for s in samples] == list(range(7))
    assert [s["png"] for s in samples] == [_png(n) for n in range(7)]
    # Anonymous temporary files: nothing but the copies is left in the directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]


def test_shards_roll_over_at_the_byte_limit(tmp_path: Path) -> None:
    writer = ShardWriter(directory=tmp_path, max_bytes=3 * 10240)
    _fill(writer, 12)
    paths = writer.write_to(tmp_path)
    assert len(paths) > 1
    assert all(p.stat().st_size <= 3 * 10240 for p in paths)
    assert sum(len(_read([p])) for p in paths) == 12


def test_tar_headers_are_fixed_and_bytes_repeat(tmp_path: Path) -> None:
    copies = []
    for name in ("a", "b"):
        writer = ShardWriter(directory=tmp_path, max_samples=4)
        _fill(writer, 5)
        (tmp_path / name).mkdir()
        copies.append([p.read_bytes() for p in writer.write_to(tmp_path / name)])
    assert copies[0] == copies[1] and len(copies[0]) == 2
    with tarfile.open(fileobj=io.BytesIO(copies[0][0])) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000_00000.png", "000_00000.cls", "000_00000.json"]
    assert len(members) == 12
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.isreg()


@pytest.mark.parametrize("key", ["", "a.b", "a/b"])
def test_keys_without_dots_or_slashes(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        ShardWriter(directory=tmp_path).add(key, [("png", b"x")])


def test_a_key_is_used_once(tmp_path: Path) -> None:
    writer = ShardWriter(directory=tmp_path)
    writer.add("000_00000", [("cls", b"0")])
    with pytest.raises(ValueError, match="already"):
        writer.add("000_00000", [("cls", b"0")])
    writer.close()


# ---- the assembly path (a sharded job's parts) ---------------------------------------------


def test_assembly_from_parts_fills_the_shards_even_without_imagefolder(tmp_path: Path) -> None:
    """``_copy_part`` keeps each PNG for webdataset alone; no train/ tree is written."""
    cls = ClassInfo(index=0, label="cat")
    part = tmp_path / "part.zip"
    with ArchiveWriter(final=part, partial=tmp_path / ".part.zip.part") as writer:
        for n in range(3):
            meta = {"label": 0, "label_name": "cat", "prompt": "a cat", "seed": n}
            writer.add_png(image_name(0, "cat", n), _png(n), **meta)
        writer.commit({})
    spec = DatasetSpec.model_validate(
        {"labels": ["cat"], "ipc": 3, "augment": {"policy": "none"}, "formats": ["webdataset"]}
    )
    final = tmp_path / "job.zip"
    with ArchiveWriter(final=final, partial=tmp_path / ".job.zip.part") as writer:
        outputs = sink.Outputs(spec=spec, writer=writer)
        tasks._copy_part(part, outputs, (cls,))
        entry = outputs.webdataset_entry()["webdataset"]
        writer.commit({"formats": outputs.webdataset_entry()})
    assert entry["shards"] == ["webdataset/train-000000.tar"] and entry["samples"] == 3
    with zipfile.ZipFile(final) as zf:
        assert zf.namelist() == ["webdataset/train-000000.tar", "manifest.json"]
        assert zf.getinfo("webdataset/train-000000.tar").compress_type == zipfile.ZIP_STORED
        paths = _extract_tars(zf, tmp_path)
    samples = _read(paths)
    assert [s["__key__"] for s in samples] == ["000_00000", "000_00001", "000_00002"]
    assert [s["png"] for s in samples] == [_png(n) for n in range(3)]
    assert samples[1]["json"] == {
        "file_name": "000_cat/000_00001.png",
        "label": 0,
        "label_name": "cat",
        "prompt": "a cat",
        "seed": 1,
    }


def test_png_is_encoded_for_webdataset_alone() -> None:
    spec = DatasetSpec.model_validate(
        {"labels": ["cat"], "ipc": 1, "image_size": 8, "formats": ["webdataset"]}
    )
    cls = spec.classes()[0]
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    done = postprocess.finish_item(spec, cls, 0, 1, "a cat", image, np.zeros((10, 10, 3), np.uint8))
    assert done[0].png == encode_png(image)


def test_estimate_counts_the_shards_and_one_temporary_copy() -> None:
    base = {"labels": ["a", "b"], "ipc": 10, "image_size": 32}
    folder = space.estimate_bytes(DatasetSpec.model_validate({**base, "formats": ["imagefolder"]}))
    both = space.estimate_bytes(
        DatasetSpec.model_validate({**base, "formats": ["imagefolder", "webdataset"]})
    )
    assert both - folder == 2 * 20 * (32 * 32 * 3 + 1536)


# ---- a real job through the service --------------------------------------------------------


def test_job_shards_load_in_webdataset_and_datasets_with_the_imagefolder_data(
    client: TestClient,
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job, data = run_job(client, BODY)
    zf = zipfile.ZipFile(io.BytesIO(data))
    rows = _rows(zf)
    assert len(rows) == 12
    tars = [n for n in zf.namelist() if n.startswith("webdataset/")]
    assert tars == ["webdataset/train-000000.tar"]
    assert zf.getinfo(tars[0]).compress_type == zipfile.ZIP_STORED

    paths = _extract_tars(zf, tmp_path)
    samples = _read(paths)
    assert len(samples) == len(rows)
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert keys[:3] == ["000_00000", "000_00001", "000_00002"]
    assert all("." not in k for k in keys)
    assert [s["cls"] for s in samples] == [r["label"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert [s["json"] for s in samples] == rows
    assert [s["png"] for s in samples] == [zf.read(f"train/{r['file_name']}") for r in rows]

    # PIL decoding, as a training loop would use it.
    first = next(iter(wds.WebDataset([str(paths[0])], shardshuffle=False).decode("pil")))
    assert first["png"].size == (16, 16) and first["png"].mode == "RGB"

    formats = json.loads(zf.read("manifest.json"))["formats"]
    assert formats["webdataset"]["shards"] == tars
    assert formats["webdataset"]["samples"] == 12
    assert list(formats) == ["imagefolder", "webdataset"]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from datasets import load_dataset

    loaded = load_dataset(
        "webdataset",
        data_files={"train": [str(p) for p in paths]},
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert loaded.num_rows == 12
    assert loaded[0]["__key__"] == "000_00000"
    assert list(loaded["cls"]) == [r["label"] for r in rows]
    assert loaded[5]["json"]["file_name"] == rows[5]["file_name"]

    again, data_again = run_job(client, BODY)
    assert again["id"] != job["id"]
    assert hashlib.sha256(data_again).hexdigest() == hashlib.sha256(data).hexdigest()


def test_webdataset_alone_has_no_train_tree(
    client: TestClient, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    body = {**BODY, "formats": ["webdataset"], "labels": ["cat", "dog"], "ipc": 2}
    _, data = run_job(client, body)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert not [n for n in zf.namelist() if n.startswith("train/")]
    samples = _read(_extract_tars(zf, tmp_path))
    assert [s["__key__"] for s in samples] == ["000_00000", "000_00001", "001_00000", "001_00001"]
    assert [s["json"]["file_name"] for s in samples][2] == "001_dog/001_00000.png"
    assert all(s["png"].startswith(b"\x89PNG") for s in samples)
    assert list(json.loads(zf.read("manifest.json"))["formats"]) == ["webdataset"]
