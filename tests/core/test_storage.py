"""One behaviour suite for both stores: a local directory and a real S3 server (rclone)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from redis import Redis

from core import retention
from core.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    open_object,
    open_storage,
)
from service.redis_server import EmbeddedRedis
from tests.conftest import S3Server, make_settings

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3_server")
    settings = make_settings(
        "redis://unused",
        tmp_path / "scratch",
        **server.settings_overrides(f"t-{uuid.uuid4().hex[:8]}"),
    )
    # A small part size, so a 20 MiB file goes up as a multipart upload.
    return S3Storage.from_settings(
        settings, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB
    )


def _file(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def test_put_consumes_the_source_and_reports_its_size(store: Storage, tmp_path: Path) -> None:
    source = _file(tmp_path / "work", ".job.zip.part", b"x" * 1000)
    assert store.put("job.zip", source) == 1000
    assert not source.exists()
    assert store.size("job.zip") == 1000
    assert store.get_bytes("job.zip") == b"x" * 1000
    with store.local_copy("job.zip") as copy:
        assert copy.read_bytes() == b"x" * 1000
    if isinstance(store, S3Storage):
        assert not copy.exists()
        assert store.local_path("job.zip") is None
    else:
        assert store.local_path("job.zip") == tmp_path / "store" / "job.zip"


def test_put_of_the_keys_own_file_is_a_no_op(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    own = _file(tmp_path, "a.zip", b"abc")
    assert store.put("a.zip", own) == 3
    assert own.read_bytes() == b"abc"


def test_large_file_round_trips_with_ranges(store: Storage, tmp_path: Path) -> None:
    data = os.urandom(20 * MiB + 12345)
    source = _file(tmp_path / "work", "big.zip", data)
    calls: list[str] = []
    if isinstance(store, S3Storage):
        store.client.meta.events.register(
            "before-call.s3.CreateMultipartUpload", lambda **_: calls.append("multipart")
        )
    assert store.put("parts/j1/0000.zip", source) == len(data)
    if isinstance(store, S3Storage):
        assert calls == ["multipart"]
    digest = hashlib.sha256(data).hexdigest()
    with store.local_copy("parts/j1/0000.zip") as copy:
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    whole = b"".join(store.read_range("parts/j1/0000.zip"))
    assert hashlib.sha256(whole).hexdigest() == digest
    chunks = list(store.read_range("parts/j1/0000.zip", 0, 3 * MiB))
    assert max(len(c) for c in chunks) <= MiB
    assert b"".join(chunks) == data[: 3 * MiB + 1]
    assert b"".join(store.read_range("parts/j1/0000.zip", 100, 199)) == data[100:200]
    assert b"".join(store.read_range("parts/j1/0000.zip", 7, 7)) == data[7:8]
    tail = b"".join(store.read_range("parts/j1/0000.zip", len(data) - 10))
    assert tail == data[-10:]
    assert b"".join(store.read_range("parts/j1/0000.zip", len(data))) == b""


def test_absent_keys(store: Storage) -> None:
    assert store.size("nope.zip") is None
    with pytest.raises(FileNotFoundError):
        store.get_bytes("nope.zip")
    with pytest.raises(FileNotFoundError), store.local_copy("nope.zip"):
        pass
    with pytest.raises(FileNotFoundError):
        b"".join(store.read_range("nope.zip"))
    store.delete("nope.zip")
    assert list(store.list("nope")) == []


def test_list_delete_and_delete_prefix(store: Storage, tmp_path: Path) -> None:
    store.put_bytes("a.preview.png", b"png")
    store.put_bytes("a.manifest.json", b"{}")
    store.put("a.zip", _file(tmp_path / "w", "a", b"zip!"))
    for shard in range(3):
        store.put_bytes(f"parts/a/{shard:04d}.zip", b"s" * (shard + 1))
    store.put_bytes("parts/b/0000.zip", b"other")

    listed = {o.key: o for o in store.list()}
    assert set(listed) == {
        "a.preview.png",
        "a.manifest.json",
        "a.zip",
        "parts/a/0000.zip",
        "parts/a/0001.zip",
        "parts/a/0002.zip",
        "parts/b/0000.zip",
    }
    assert listed["a.zip"].size == 4
    assert listed["parts/a/0002.zip"].size == 3
    assert all(abs(o.modified - listed["a.zip"].modified) < 300 for o in listed.values())
    assert [o.key for o in store.list("parts/a/")] == [
        "parts/a/0000.zip",
        "parts/a/0001.zip",
        "parts/a/0002.zip",
    ]
    assert {o.key for o in store.list("a.")} == {"a.preview.png", "a.manifest.json", "a.zip"}

    store.delete("a.zip")
    assert store.size("a.zip") is None
    assert store.delete_prefix("parts/a/") == 3
    assert store.delete_prefix("parts/a/") == 0
    assert {o.key for o in store.list("parts/")} == {"parts/b/0000.zip"}
    if isinstance(store, LocalStorage):
        assert not (store.root / "parts" / "a").exists()


def test_put_bytes_replaces_whole_objects(store: Storage) -> None:
    store.put_bytes("j.manifest.json", b'{"a": 1}')
    store.put_bytes("j.manifest.json", b'{"a": 2}')
    assert store.get_bytes("j.manifest.json") == b'{"a": 2}'
    assert [o.key for o in store.list("j.")] == ["j.manifest.json"]


def test_open_object_reads_a_zip_member_without_a_download(store: Storage, tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("big.bin", os.urandom(3 * MiB))
        zf.writestr("manifest.json", b'{"ok": true}')
    store.put("z.zip", path)
    with open_object(store, "z.zip") as handle, zipfile.ZipFile(handle) as zf:
        assert zf.read("manifest.json") == b'{"ok": true}'
    with pytest.raises(FileNotFoundError), open_object(store, "none.zip"):
        pass


def test_presign(store: Storage) -> None:
    store.put_bytes("p.zip", b"presigned bytes")
    url = store.presign("p.zip", seconds=120, filename="distill-p.zip")
    if isinstance(store, LocalStorage):
        assert url is None
        return
    assert url is not None
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"presigned bytes"
    assert 'filename="distill-p.zip"' in response.headers.get("content-disposition", "")
    tampered = url.replace("p.zip", "q.zip")
    assert httpx.get(tampered).status_code in (403, 404)


@pytest.mark.parametrize("key", ["", "/abs.zip", "../up.zip", "parts/../x.zip", "a//b", "a\\b"])
def test_bad_keys_are_rejected(store: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.size(key)


def test_missing_bucket_names_the_setting(s3_server: S3Server, tmp_path: Path) -> None:
    overrides = s3_server.settings_overrides("x")
    overrides["storage"] = "s3://no-such-bucket/x"
    store = S3Storage.from_settings(make_settings("redis://unused", tmp_path, **overrides))
    with pytest.raises(StorageError, match="DISTILL_STORAGE=s3://no-such-bucket/x"):
        store.check()
    with pytest.raises(StorageError, match=r"DISTILL_STORAGE.*does not exist"):
        store.put_bytes("a.png", b"x")
    with pytest.raises(StorageError, match=r"DISTILL_STORAGE.*does not exist"):
        store.get_bytes("a.png")
    source = _file(tmp_path, "a.zip", b"data")
    with pytest.raises(StorageError, match="DISTILL_STORAGE"):
        store.put("a.zip", source)
    assert source.exists()


def test_unreachable_endpoint_names_it(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = make_settings(
        "redis://unused",
        tmp_path,
        storage="s3://b/p",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_access_key_id="k",
        s3_secret_access_key="s",
    )
    store = S3Storage.from_settings(settings)
    with pytest.raises(StorageError, match=f"DISTILL_S3_ENDPOINT_URL=http://127.0.0.1:{port}"):
        store.check()


def test_open_storage_picks_the_store(tmp_path: Path, s3_server: S3Server) -> None:
    default = open_storage(make_settings("redis://unused", tmp_path))
    assert isinstance(default, LocalStorage)
    assert default.url == tmp_path.absolute().as_uri()
    assert open_storage(make_settings("redis://unused", tmp_path)) is default
    elsewhere = open_storage(make_settings("redis://unused", tmp_path, storage=str(tmp_path / "s")))
    assert elsewhere.local_path("a.zip") == tmp_path / "s" / "a.zip"
    remote = open_storage(
        make_settings("redis://unused", tmp_path, **s3_server.settings_overrides("pre/fix"))
    )
    assert isinstance(remote, S3Storage)
    assert remote.url == f"s3://{s3_server.bucket}/pre/fix"
    remote.check()
    with pytest.raises(StorageError, match="DISTILL_STORAGE"):
        open_storage(make_settings("redis://unused", tmp_path, storage="ftp://host/dir"))
    with pytest.raises(StorageError, match="DISTILL_STORAGE"):
        open_storage(make_settings("redis://unused", tmp_path, storage="s3://"))


def test_retention_sweep_over_the_store(
    store: Storage, tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    redis = Redis.from_url(redis_server.url)
    expired, kept, running, unknown = (uuid.uuid4().hex for _ in range(4))
    now = time.time()
    redis.hset(f"distill:job:{expired}", mapping={"outcome": "succeeded", "expires_at": now - 1})
    redis.hset(f"distill:job:{kept}", mapping={"outcome": "succeeded", "expires_at": now + 99})
    redis.hset(f"distill:job:{running}", mapping={"started_at": now})
    for job in (expired, kept, running, unknown):
        for suffix in (".zip", ".preview.png", ".manifest.json"):
            store.put_bytes(f"{job}{suffix}", b"x")
        store.put_bytes(f"parts/{job}/0000.zip", b"part")
    store.put_bytes("notes/readme.txt", b"not ours")
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    old = now - 3600
    files = {
        f".{unknown}.zip.part": False,
        f".{running}.zip.part": True,
        f".parts-{running}-0001.zip.part": True,
        f".parts-{kept}-0000.zip.upload": False,
        f".{expired}.zip.upload": False,
    }
    for name in files:
        (scratch / name).write_bytes(b"partial")
        os.utime(scratch / name, (old, old))
    fresh = scratch / f".{uuid.uuid4().hex}.zip.part"
    fresh.write_bytes(b"just started")
    # Copies fetched from an object store: an abandoned one goes, one in use stays.
    abandoned, in_use = scratch / ".download-abc.tmp", scratch / ".download-def.tmp"
    abandoned.write_bytes(b"zip")
    os.utime(abandoned, (old, old))
    in_use.write_bytes(b"zip")
    if isinstance(store, LocalStorage):
        # Shards being written into a directory store, before their rename.
        (store.root / "parts" / unknown / ".0001.zip.part").write_bytes(b"orphan")
        (store.root / "parts" / running / ".0001.zip.part").write_bytes(b"in progress")
    try:
        removed = retention.sweep(redis, store, scratch, stale_after=60, downloads_after=600)
        again = retention.sweep(redis, store, scratch, stale_after=60, downloads_after=600)
    finally:
        for job in (expired, kept, running):
            redis.delete(f"distill:job:{job}")
        redis.close()
    left = {o.key for o in store.list()}
    assert left == {
        *(
            f"{job}{s}"
            for job in (kept, running)
            for s in (".zip", ".preview.png", ".manifest.json")
        ),
        f"parts/{running}/0000.zip",
        "notes/readme.txt",
    }
    assert f"parts/{unknown}/" in removed and f"parts/{kept}/" in removed
    for name, stays in files.items():
        assert (scratch / name).exists() is stays, name
    assert fresh.exists()
    assert not abandoned.exists() and in_use.exists()
    assert again == []
    if isinstance(store, LocalStorage):
        assert not (store.root / "parts" / unknown).exists()
        assert (store.root / "parts" / running / ".0001.zip.part").exists()
