"""Reference-set routes over the real app and Redis: upload, list, read, delete, refusals."""

from __future__ import annotations

import io
import json
import random
import socket
import struct
import tarfile
import time
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from core import keys
from service import stack
from service.app import create_app
from service.redis_server import EmbeddedRedis, free_port
from tests.conftest import TEST_ENV, make_settings, stop_worker, wait_until_serving

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


def zip_bytes(
    members: dict[str, bytes], *, deflate: bool = False, method: int | None = None
) -> bytes:
    out = io.BytesIO()
    if method is None:
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


def _flagged(data: bytes, bit: int) -> bytes:
    """A zip with general-purpose flag ``bit`` set in every local and central header."""
    out = bytearray(data)
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := out.find(signature, start)) >= 0:
            struct.pack_into(
                "<H", out, start + at, struct.unpack_from("<H", out, start + at)[0] | bit
            )
            start += 4
    return bytes(out)


def _corrupt(method: int, skip: int) -> bytes:
    """A zip whose second member's compressed data is overwritten with 0xFF bytes."""
    data = bytearray(zip_bytes({"cat/1.png": png(), "cat/2.png": noise()}, method=method))
    header = data.rfind(b"PK\x03\x04", 0, data.find(b"cat/2.png"))
    name_len, extra_len = struct.unpack_from("<HH", data, header + 26)
    at = header + 30 + name_len + extra_len + skip
    data[at : at + 16] = b"\xff" * 16
    return bytes(data)


def _tar_with_pax(pax: dict[str, str], *, mode: str = "w", name: str = "cat/2.png") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode, format=tarfile.PAX_FORMAT) as archive:
        first = tarfile.TarInfo("cat/1.png")
        first.size = len(png())
        archive.addfile(first, io.BytesIO(png()))
        info = tarfile.TarInfo(name)
        info.size = len(png((3, 3, 3)))
        info.pax_headers = pax
        archive.addfile(info, io.BytesIO(png((3, 3, 3))))
    return out.getvalue()


def _nul_name() -> bytes:
    body = zip_bytes({"cat/1.png": png(), "cat/x.png#../../evil": png((4, 4, 4))})
    return body.replace(b"cat/x.png#", b"cat/x.png\x00")


def _duplicates() -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("cat/1.png", png())
            archive.writestr("cat/1.png", png((9, 9, 9)))
    return out.getvalue()


def _truncated_pixels(side: int = 64) -> bytes:
    """A PNG with well-formed chunks (checksums right) whose IDAT holds half the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = random.Random(3).randbytes(3 * side * side)
    raw = b"".join(b"\x00" + rows[i * 3 * side : (i + 1) * 3 * side] for i in range(side))
    idat = zlib.compress(raw)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    return head + chunk(b"IDAT", idat[: len(idat) // 2]) + chunk(b"IEND", b"")


NFC, NFD = "cr\u00e8me", "cre\u0300me"


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
    (
        "bad central directory",
        zip_bytes({"cat/1.png": png()}).replace(b"PK\x01\x02", b"PK\x01\x09"),
        "application/zip",
        422,
        None,
    ),
    (
        "name not UTF-8 under the UTF-8 flag",
        _flagged(zip_bytes({"cat/1.png": png(), "cat/XX.png": png()}), 0x800).replace(
            b"cat/XX.png", b"cat/\xff\xfe.png"
        ),
        "application/zip",
        422,
        None,
    ),
    ("corrupt deflate", _corrupt(zipfile.ZIP_DEFLATED, 0), "application/zip", 422, "cat/2.png"),
    ("corrupt lzma", _corrupt(zipfile.ZIP_LZMA, 9), "application/zip", 422, "cat/2.png"),
    (
        "garbage sparse map",
        _tar_with_pax({"GNU.sparse.map": "x,y", "GNU.sparse.major": "0", "GNU.sparse.minor": "1"}),
        "application/x-tar",
        422,
        None,
    ),
    ("NUL in a zip name", _nul_name(), "application/zip", 422, "cat/x.png\x00../../evil"),
    (
        "folders differing by case",
        zip_bytes({"Cat/1.png": png(), "cat/2.png": png((5, 5, 5))}),
        "application/zip",
        422,
        "cat",
    ),
    (
        "folders NFC and NFD",
        zip_bytes({f"{NFC}/1.png": png(), f"{NFD}/2.png": png((5, 5, 5))}),
        "application/zip",
        422,
        max(NFC, NFD),
    ),
    ("one name, two contents", _duplicates(), "application/zip", 422, "cat/1.png"),
    (
        "png followed by a zip",
        zip_bytes({"cat/1.png": png(), "cat/2.png": png() + zip_bytes({"x/y.sh": b"rm -rf"})}),
        "application/zip",
        422,
        "cat/2.png",
    ),
    (
        "truncated pixel data",
        zip_bytes({"cat/1.png": png(), "cat/2.png": _truncated_pixels()}),
        "application/zip",
        422,
        "cat/2.png",
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
    elif status == 422:
        assert "the archive" in problem["detail"], problem
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


# --- over a real socket: a server process of its own -------------------------------------------


@dataclass
class Live:
    """``python -m service`` on a free port, logging at INFO to ``log``."""

    base: str
    port: int
    data: Path
    log: Path

    def records(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def live(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live-references")
    settings = make_settings(
        redis_server.url,
        root / "data",
        queue_name=f"live-refs-{uuid.uuid4().hex[:6]}",
        port=free_port(),
        log_level="INFO",
        max_reference_bytes=LIMIT,
        max_reference_images=5,
        max_reference_pixels=1_000_000,
    )
    log = root / "api.log"
    proc = stack.spawn("service", settings, log=log, env=TEST_ENV)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_until_serving(f"{base}/healthz", proc, log)
        yield Live(base, settings.port, root / "data", log)
    finally:
        stop_worker(proc)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_a_tar_header_declaring_a_huge_size_is_answered_at_once(live: Live, mode: str) -> None:
    body = _tar_with_pax({"size": str(10**15)}, mode=mode)
    started = time.monotonic()
    # Before, the first header pass skipped 10**15 bytes in stream mode: no answer, ever.
    response = httpx.post(
        f"{live.base}/v1/references",
        content=body,
        headers={"content-type": "application/x-tar"},
        timeout=15,
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 413, response.text
    assert repr("cat/2.png") in response.json()["detail"]
    assert stored_files(live.data) == []  # no scratch .ref-* file left


def test_a_client_that_disconnects_mid_upload_is_an_info_line_and_leaves_nothing(
    live: Live,
) -> None:
    body = zip_bytes(GOOD)
    head = (
        "POST /v1/references HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/zip\r\nContent-Length: {10 * len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", live.port)) as connection:
        connection.sendall(head.encode() + body)
        time.sleep(0.5)  # the route is streaming the body to its scratch file now
    deadline = time.monotonic() + 10
    while not any("disconnected" in r["msg"] for r in live.records()):
        assert time.monotonic() < deadline, live.log.read_text()
        time.sleep(0.05)
    records = live.records()
    [line] = [r for r in records if "disconnected" in r["msg"]]
    assert line["level"] == "INFO" and line["received_bytes"] == len(body)
    assert [r for r in records if r["level"] in ("ERROR", "CRITICAL")] == []
    assert stored_files(live.data) == []


def test_mutated_uploads_are_never_a_server_error(app: Api, redis: Redis) -> None:
    """A smaller share of ``tests/core/test_reference_fuzz.py``'s mutations, through HTTP."""
    rng = random.Random("reference-http-fuzz")
    bases = [
        (zip_bytes(GOOD, deflate=True), "application/zip"),
        (tar_bytes(GOOD, mode="w"), "application/x-tar"),
        (tar_bytes(GOOD, mode="w:gz"), "application/gzip"),
    ]
    records = set(redis.scan_iter(match=keys.reference("*")))
    statuses: dict[int, int] = {}
    for index in range(60):
        original, media = bases[index % len(bases)]
        body = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body))
            if rng.random() < 0.3:
                del body[at:]
            else:
                body[at : at + rng.randint(1, 8)] = rng.randbytes(rng.randint(1, 8))
        response = app.upload(bytes(body), media=media)
        assert response.status_code < 500, (index, response.text)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 201:
            reference = response.json()["id"]
            gone = app.client.delete(f"/v1/references/{reference}", headers=_auth(app.alice))
            assert gone.status_code == 204
        else:
            assert response.headers["content-type"] == "application/problem+json"
        assert stored_files(app.data) == [], index
    assert set(redis.scan_iter(match=keys.reference("*"))) == records
    assert len(statuses) >= 2, statuses
