"""The same request gives the same archive, byte for byte, whatever the parallelism: pools of
1, 2 and 4 post-processing threads or 2 processes, one piece or shards, one worker or two, a
fresh worker or one that made the job before.

A fixed-ipc job's manifest holds no times or ids (``worker.outputs.manifest.build``), so no
member is exempt: every member's bytes are compared, then the whole zip.

The job is the one that once showed the difference (copies of a few images one pixel level
apart on two workers): shards of 12 sampled images cut classes of 5 in two, so on two workers
a shard starts on a worker that has not seen the class before it.
"""

from __future__ import annotations

import hashlib
import io
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from service.stack import Stack, wait_for_worker
from tests.conftest import TEST_ENV, make_settings, wait_for, with_model

LABELS = [f"class {i}" for i in range(20)]
#: 20 classes x ipc 25 (5 sampled + 20 copies each) = 500 images at 32 px.
JOB: dict[str, Any] = {
    "labels": LABELS,
    "ipc": 25,
    "seed": 11,
    "image_size": 32,
    "augment": {"policy": "paper", "copies": 4},
}
#: 10 sampled images a shard, rounded up to the batch size (4): 12, so 9 shards.
SHARD_IMAGES = 50
ONE_PIECE = 100_000
#: Queue -> the post-processing pools of the workers listening to it, one worker each.
POOLS: dict[str, list[tuple[str, int]]] = {
    "det-threads-1": [("threads", 1)],
    "det-threads-4": [("threads", 4)],
    "det-pair": [("threads", 2), ("processes", 2)],
}


@pytest.fixture(scope="module")
def stack(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Four fresh workers (one torch thread each), started together: one per single-worker
    queue and two on ``det-pair``, one with a thread pool and one with a process pool."""
    base = tmp_path_factory.mktemp("determinism")
    settings = make_settings(
        redis_server.url, base / "data", shard_images=SHARD_IMAGES, torch_threads=1
    )
    stack = Stack(with_model(settings, tiny_model), logs=base, env=TEST_ENV)
    started = []
    try:
        for queue, pools in POOLS.items():
            for mode, size in pools:
                own = {
                    "queue_name": queue,
                    "postprocess_mode": mode,
                    "postprocess_workers": size,
                }
                started.append((stack.start_worker(wait=False, **own), own))
        for proc, own in started:
            wait_for_worker(proc, stack.settings.model_copy(update=own))
        yield stack
    finally:
        # Ask every worker to stop at once; close() then waits for each in turn.
        for proc in stack.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        stack.close()


def _make(stack: Stack, queue: str, *, shard_images: int) -> tuple[dict[str, Any], bytes]:
    """Run ``JOB`` on ``queue`` (sharded unless ``shard_images`` is ONE_PIECE); the finished
    job and its archive."""
    settings = stack.settings.model_copy(update={"queue_name": queue, "shard_images": shard_images})
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/jobs", json=JOB)
        assert response.status_code == 202, response.text
        done = wait_for(client.get, response.json()["id"], timeout=240)
        assert done["state"] == "succeeded", done
        archive = client.get(f"/v1/jobs/{done['id']}/archive")
        assert archive.status_code == 200, archive.text
    assert hashlib.sha256(archive.content).hexdigest() == done["archive"]["sha256"]
    return done, archive.content


def _assert_same_archive(made: bytes, reference: bytes) -> None:
    """Same members in the same order with the same bytes (named when one differs), then the
    same zip."""
    with zipfile.ZipFile(io.BytesIO(made)) as a, zipfile.ZipFile(io.BytesIO(reference)) as b:
        assert a.namelist() == b.namelist()
        differ = [name for name in a.namelist() if a.read(name) != b.read(name)]
        assert differ == []
        pngs = [n for n in a.namelist() if n.startswith("train/") and n.endswith(".png")]
        assert len(pngs) == 500
    assert made == reference


@pytest.fixture(scope="module")
def reference(stack: Stack) -> bytes:
    """The job in 9 shards, all on one worker with one post-processing thread."""
    done, archive = _make(stack, "det-threads-1", shard_images=SHARD_IMAGES)
    assert done["shards"] is not None and len(done["shards"]) == 9
    assert len({s["worker"] for s in done["shards"]}) == 1
    return archive


def test_four_threads_in_one_piece_make_the_one_thread_sharded_archive(
    stack: Stack, reference: bytes
) -> None:
    done, archive = _make(stack, "det-threads-4", shard_images=ONE_PIECE)
    assert done["shards"] is None
    _assert_same_archive(archive, reference)


def test_two_workers_with_two_threads_and_two_processes_make_the_same_sharded_archive(
    stack: Stack, reference: bytes
) -> None:
    done, archive = _make(stack, "det-pair", shard_images=SHARD_IMAGES)
    # Both pools made some of the shards: the worker names carry their process ids.
    pair = [w.pid for w in stack.workers[-2:]]
    ran = {s["worker"] for s in done["shards"]}
    assert all(any(f".{pid}." in name for name in ran) for pid in pair), (pair, ran)
    _assert_same_archive(archive, reference)


def test_a_worker_that_made_the_job_before_makes_it_again_in_one_piece(
    stack: Stack, reference: bytes
) -> None:
    # Every prompt is cached by now (encoded while running other shards than this time).
    done, archive = _make(stack, "det-pair", shard_images=ONE_PIECE)
    assert done["shards"] is None
    _assert_same_archive(archive, reference)
