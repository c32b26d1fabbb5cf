"""A full data volume fails the job clearly and leaves no file, checked on a real small tmpfs."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings, start_worker, stop_worker, wait_for

SIZE_MIB = 24


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_before_and_during_writing_without_leftovers(
    redis_server: EmbeddedRedis, tiny_model: Path, tmp_path: Path, small_volume: Path
) -> None:
    settings = make_settings(
        redis_server.url, small_volume, queue_name=f"disk-{uuid.uuid4().hex[:6]}"
    )
    worker = start_worker(settings, tiny_model, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            # Too big from the start: 100 x 200 images of 64 px need ~250 MiB.
            big = {"labels": [f"c{i}" for i in range(100)], "ipc": 200, "image_size": 64}
            job = client.post("/v1/jobs", json=big).json()
            final = wait_for(client.get, job["id"])
            assert final["state"] == "failed"
            assert final["error"]["type"] == "disk_full"
            assert "MiB" in final["error"]["detail"]
            assert final["progress"]["generated"] == 0
            assert list(small_volume.iterdir()) == []

            # Fits at the start, then the volume fills up while it writes.
            body = {
                "labels": [f"c{i}" for i in range(100)],
                "ipc": 10,
                "image_size": 16,
                "augment": {"policy": "none"},
            }
            job = client.post("/v1/jobs", json=body).json()
            wait_for(client.get, job["id"], until=lambda j: j["progress"]["written"] > 0)
            filler = small_volume / "filler.bin"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 2**16):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
            final = wait_for(client.get, job["id"])
            assert final["state"] == "failed", final
            assert final["error"]["type"] == "disk_full"
            assert sorted(p.name for p in small_volume.iterdir()) == ["filler.bin"]
            filler.unlink()

            ok = client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 2}).json()
            assert wait_for(client.get, ok["id"])["state"] == "succeeded"
    finally:
        stop_worker(worker)
