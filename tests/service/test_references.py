"""Reference-set routes over the real app and Redis: upload, list, read, delete, refusals."""

from __future__ import annotations

import io
import random
import struct
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from core import keys
from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings

LIMIT = 1024 * 1024


def png(color: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def zip_bytes(members: dict[str, bytes], *, deflate: bool = False) -> bytes:
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return out.getvalue()


def tar_bytes(members: dict[str, bytes], *, mode: str = "w:gz", link: str | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return out.getvalue()


def noise(side: int = 32) -> bytes:
    out = io.BytesIO()
    pixels = random.Random(side).randbytes(3 * side * side)  # incompressible
    Image.frombytes("RGB", (side, side), pixels).save(out, format="PNG")
    return out.getvalue()


GOOD = {"pets/cat/1.png": png((1, 1, 1)), "pets/cat/2.png": noise(), "pets/dog/3.png": png()}


@dataclass
class Api:
    """The app under test, its data directory and two API keys of its own."""

    client: TestClient
    data: Path
    alice: str
    bob: str

    def upload(
        self, body: Any, *, key: str | None = None, media: str = "application/zip", **params: str
    ) -> Any:
        headers = {**_auth(key or self.alice), "content-type": media}
        return self.client.post("/v1/references", content=body, headers=headers, params=params)


@pytest.fixture
def app(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Api]:
    data = tmp_path / "data"
    alice, bob = f"alice-{uuid.uuid4().hex}", f"bob-{uuid.uuid4().hex}"
    settings = make_settings(
        redis_server.url,
        data,
        queue_name=f"refs-{uuid.uuid4().hex[:6]}",
        api_keys=f"{alice},{bob}",
        max_body_bytes=1024,
        max_reference_bytes=LIMIT,
        max_reference_images=5,
        max_reference_pixels=1_000_000,
    )
    with TestClient(create_app(settings)) as client:
        yield Api(client, data, alice, bob)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stored_files(data: Path) -> list[str]:
    return sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())


def test_upload_list_get_delete(app: Api) -> None:
    client, data, alice = app.client, app.data, app.alice
    body = zip_bytes(GOOD)
    assert len(body) > 1024  # over DISTILL_MAX_BODY_BYTES: uploads have their own limit
    created = app.upload(body, name="pets")
    assert created.status_code == 201, created.text
    info = created.json()
    assert created.headers["location"] == f"/v1/references/{info['id']}"
    assert info["name"] == "pets" and info["images"] == 3 and "owner" not in info
    assert [(c["name"], c["images"]) for c in info["classes"]] == [("cat", 2), ("dog", 1)]
    assert info["expires_at"] > info["created_at"]
    assert stored_files(data) == [f"references/{info['id']}.zip"]

    again = app.upload(tar_bytes(GOOD), media="application/gzip")
    assert again.status_code == 201, again.text
    assert again.json()["digest"] == info["digest"]  # same images, same digest

    listed = client.get("/v1/references", headers=_auth(alice)).json()["references"]
    assert [r["id"] for r in listed] == [again.json()["id"], info["id"]]
    assert client.get(f"/v1/references/{info['id']}", headers=_auth(alice)).json() == info

    assert client.delete(f"/v1/references/{info['id']}", headers=_auth(alice)).status_code == 204
    gone = client.get(f"/v1/references/{info['id']}", headers=_auth(alice))
    assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
    assert client.delete(f"/v1/references/{info['id']}", headers=_auth(alice)).status_code == 404
    assert stored_files(data) == [f"references/{again.json()['id']}.zip"]


def test_another_key_sees_none_of_it(app: Api) -> None:
    client, data, alice, bob = app.client, app.data, app.alice, app.bob
    info = app.upload(zip_bytes(GOOD)).json()
    assert client.get(f"/v1/references/{info['id']}", headers=_auth(bob)).status_code == 404
    assert client.delete(f"/v1/references/{info['id']}", headers=_auth(bob)).status_code == 404
    assert client.get("/v1/references", headers=_auth(bob)).json() == {"references": []}
    assert client.get("/v1/references").status_code == 401
    assert app.upload(zip_bytes(GOOD), key="not-a-key").status_code == 401
    # Still there for its owner.
    assert client.get(f"/v1/references/{info['id']}", headers=_auth(alice)).status_code == 200
    assert stored_files(data) == [f"references/{info['id']}.zip"]


HOSTILE = [
    (
        "zip slip",
        zip_bytes({"cat/1.png": png(), "../x.png": png()}),
        "application/zip",
        422,
        "../x.png",
    ),
    (
        "absolute",
        zip_bytes({"cat/1.png": png(), "/etc/x.png": png()}),
        "application/zip",
        422,
        "/etc/x.png",
    ),
    (
        "symlink",
        tar_bytes({"cat/1.png": png()}, link="cat/2.png"),
        "application/gzip",
        422,
        "cat/2.png",
    ),
    (
        "nested zip",
        zip_bytes({"cat/1.png": png(), "cat/more.zip": zip_bytes({"a/b.png": png()})}),
        "application/zip",
        422,
        "cat/more.zip",
    ),
    (
        "text as png",
        zip_bytes({"cat/1.png": png(), "cat/2.png": b"hello\n" * 9}),
        "application/zip",
        422,
        "cat/2.png",
    ),
    (
        "zip bomb",
        zip_bytes({"cat/1.png": png(), "cat/2.png": b"\0" * (50 << 20)}, deflate=True),
        "application/zip",
        413,
        "cat/2.png",
    ),
    (
        "huge header",
        zip_bytes({"cat/1.png": png(), "cat/2.png": png_header(50_000, 50_000)}),
        "application/zip",
        413,
        "cat/2.png",
    ),
    (
        "too many images",
        zip_bytes({f"cat/{i}.png": png((i, 0, 0)) for i in range(6)}),
        "application/zip",
        413,
        "cat/5.png",
    ),
    ("not an archive", b"just bytes " * 50, "application/zip", 415, None),
    ("wrong media type", zip_bytes({"cat/1.png": png()}), "application/json", 415, None),
]


@pytest.mark.parametrize(
    ("body", "media", "status", "member"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
def test_hostile_uploads_are_refused_and_leave_nothing(
    app: Api,
    redis: Redis,
    body: bytes,
    media: str,
    status: int,
    member: str | None,
) -> None:
    client, data, alice = app.client, app.data, app.alice
    records = set(redis.scan_iter(match=keys.reference("*")))
    response = app.upload(body, media=media)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    if member is not None:
        assert repr(member) in problem["detail"], problem
    assert stored_files(data) == []  # nothing stored, no scratch file left
    assert client.get("/v1/references", headers=_auth(alice)).json() == {"references": []}
    assert set(redis.scan_iter(match=keys.reference("*"))) == records


def test_an_oversized_upload_is_cut_off_while_streaming(app: Api) -> None:
    data = app.data

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\0" * 65536  # 2.5 MiB in all, without a Content-Length

    response = app.upload(chunks())
    assert response.status_code == 413, response.text
    assert str(LIMIT) in response.json()["detail"]
    declared = app.upload(b"\0" * (LIMIT + 1))
    assert declared.status_code == 413
    assert stored_files(data) == []


def test_name_is_validated(app: Api) -> None:
    response = app.upload(zip_bytes(GOOD), name="../etc")
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "name"
