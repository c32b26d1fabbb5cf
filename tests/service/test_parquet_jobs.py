"""The parquet format through the service: a sharded job's Parquet shards are written at
assembly from the parts and equal the one-piece archive's byte for byte; format values the
contract refuses are 422s naming ``formats``."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from service.stack import Stack
from tests.conftest import TEST_ENV, make_settings, wait_for, with_model

LABELS = ["zebra", "apple", "crème brûlée", "dog", "cat", "owl"]
#: 6 classes x ipc 4 (2 sampled + 2 copies each) = 24 images; 8 per shard = 3 shards.
JOB: dict[str, Any] = {
    "labels": LABELS,
    "ipc": 4,
    "image_size": 16,
    "seed": 11,
    "augment": {"policy": "paper", "copies": 1},
    "formats": ["imagefolder", "parquet"],
}
SHARD_IMAGES = 8
PARQUET = "data/train-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def pair(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Two worker processes on their own queue (one torch thread each)."""
    base = tmp_path_factory.mktemp("parquet-shards")
    settings = make_settings(
        redis_server.url,
        base / "data",
        queue_name="parquet-shards",
        shard_images=SHARD_IMAGES,
        torch_threads=1,
    )
    stack = Stack(with_model(settings, tiny_model), logs=base, env=TEST_ENV)
    for _ in range(2):
        stack.start_worker()
    yield stack
    stack.close()


def _run(client: TestClient, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    done = wait_for(client.get, job.json()["id"], timeout=180)
    assert done["state"] == "succeeded", done
    archive = client.get(f"/v1/jobs/{done['id']}/archive")
    assert archive.status_code == 200
    return done, archive.content


@pytest.mark.parametrize("formats", [["imagefolder", "parquet"], ["parquet"]])
def test_a_sharded_job_writes_the_parquet_of_the_one_piece_archive(
    pair: Stack, formats: list[str]
) -> None:
    body = {**JOB, "formats": formats}
    sharded_settings = pair.settings
    whole_settings = pair.settings.model_copy(update={"shard_images": 100_000})
    with TestClient(create_app(sharded_settings)) as client:
        sharded_job, sharded = _run(client, body)
    with TestClient(create_app(whole_settings)) as whole:
        whole_job, one_piece = _run(whole, body)
    assert sharded_job["shards"] is not None and len(sharded_job["shards"]) == 3
    assert len({s["worker"] for s in sharded_job["shards"]}) == 2, sharded_job["shards"]
    assert whole_job["shards"] is None

    with zipfile.ZipFile(io.BytesIO(sharded)) as a, zipfile.ZipFile(io.BytesIO(one_piece)) as b:
        assert a.namelist() == b.namelist()
        assert PARQUET in a.namelist()
        assert a.read(PARQUET) == b.read(PARQUET)
        table = pq.read_table(io.BytesIO(a.read(PARQUET)))
        if "imagefolder" in formats:
            pngs = [n for n in a.namelist() if n.startswith("train/") and n.endswith(".png")]
            assert [r["bytes"] for r in table.column("image").to_pylist()] == [
                a.read(n) for n in pngs
            ]
        else:
            assert not [n for n in a.namelist() if n.startswith("train/")]
    assert table.num_rows == 24
    assert table.column("label").to_pylist() == [i for i in range(6) for _ in range(4)]
    assert table.column("copy").to_pylist()[:4] == [None, 1, None, 1]
    assert sharded == one_piece


@pytest.mark.parametrize(
    ("formats", "field"),
    [
        (["parquet", "parquet"], "formats"),
        (["Parquet"], "formats[0]"),
        (["arrow"], "formats[0]"),
        ([], "formats"),
    ],
)
def test_refused_format_values_name_formats(
    idle_client: TestClient, formats: list[str], field: str
) -> None:
    response = idle_client.post("/v1/jobs", json={**JOB, "formats": formats})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert field in [e["field"] for e in response.json()["errors"]]
