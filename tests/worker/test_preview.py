"""Contact sheets: geometry from real archives, and the endpoint."""

from __future__ import annotations

import io
import subprocess
import zipfile

from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import run_job
from worker.outputs.preview import GAP, LABEL_WIDTH, tile_scale


def _sheet(client: TestClient, job_id: str) -> Image.Image:
    response = client.get(f"/v1/jobs/{job_id}/preview.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_sheet_has_a_row_per_class_and_upscaled_tiles(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    job, data = run_job(client, {"labels": ["cat", "dog", "ship"], "ipc": 10, "image_size": 16})
    sheet = _sheet(client, job["id"])
    tile = 16 * tile_scale(16)
    assert tile == 64
    # 3 rows; 2 samples x (1 + 4 copies) = 10 tiles per row, two group gaps.
    assert sheet.height == GAP + 3 * (tile + GAP)
    assert sheet.width == LABEL_WIDTH + 10 * (tile + GAP) + 2 * 12 + GAP
    inside = Image.open(io.BytesIO(zipfile.ZipFile(io.BytesIO(data)).read("preview.png")))
    assert inside.size == sheet.size
    # Nearest-neighbour: each tile is made of flat 4x4 blocks.
    first = sheet.crop((LABEL_WIDTH, GAP, LABEL_WIDTH + tile, GAP + tile))
    pixels = first.load()
    assert pixels[0, 0] == pixels[3, 3] and pixels[4, 4] == pixels[7, 7]


def test_sheet_caps_rows_at_twenty_classes(
    client: TestClient, worker: subprocess.Popen[bytes]
) -> None:
    job, _ = run_job(
        client, {"preset": "cifar100", "ipc": 1, "image_size": 8, "augment": {"policy": "none"}}
    )
    sheet = _sheet(client, job["id"])
    tile = 8 * tile_scale(8)
    assert sheet.height == GAP + 20 * (tile + GAP)


def test_preview_is_404_before_the_job_succeeds(idle_client: TestClient) -> None:
    job = idle_client.post("/v1/jobs", json={"labels": ["cat"], "ipc": 1}).json()
    response = idle_client.get(f"/v1/jobs/{job['id']}/preview.png")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
