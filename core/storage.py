"""Where finished archives live: a local directory or an S3-compatible bucket. No torch here.

``DISTILL_STORAGE`` picks it: unset, the data directory; a path (or ``file://`` URL), that
directory; ``s3://bucket/prefix``, that bucket (``DISTILL_S3_*`` say where and as whom). Every
process that reads or writes archives opens the same store, so API replicas and workers on
different machines see the same objects. ``DISTILL_DATA_DIR`` stays each process's own scratch
space: workers write there first and ``put`` the finished file.

Keys (relative to the store's root, "/"-separated)::

    <job_id>.zip                  the archive
    <job_id>.preview.png          its contact sheet
    <job_id>.manifest.json        the manifest with evaluation results
    parts/<job_id>/<shard>.zip    shards of a job split across workers

An object appears only complete: locally through a rename in the same directory, on S3
because an object (multipart or not) becomes visible only when its upload completes.
boto3 is imported only when an S3 store is opened, so the API's import stays light.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from core.settings import Settings

CHUNK = 1024 * 1024
#: Files above this size are uploaded in parts of ``MULTIPART_CHUNKSIZE``, several at once.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024


class StorageError(Exception):
    """The store is misconfigured or unreachable; the message names the setting or URL."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    #: Last modification, Unix time.
    modified: float


class Storage(Protocol):
    """What the API and the workers need from a store of finished files."""

    url: str

    def put(self, key: str, source: Path) -> int: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def local_copy(self, key: str) -> AbstractContextManager[Path]: ...
    def size(self, key: str) -> int | None: ...
    def read_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list(self, prefix: str = "") -> Iterator[StoredObject]: ...
    def presign(self, key: str, *, seconds: int, filename: str) -> str | None: ...
    def local_path(self, key: str) -> Path | None: ...
    def check(self) -> None: ...


def check_key(key: str) -> str:
    """``key`` if it names an object under the root; ValueError for anything that could escape
    it or that two stores would read differently (absolute, ``..``, empty segments)."""
    if not isinstance(key, str) or not key:
        raise ValueError("a storage key must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix:
        check_key(prefix.rstrip("/") or "/")
    return prefix


def attachment(filename: str) -> str:
    """A Content-Disposition value, as Starlette's FileResponse writes it."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: a crash right after it must not bring the old name back."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A directory; several machines may share it (NFS and the like)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStorage({self.url})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def check(self) -> None:
        """Raise StorageError unless the root exists (or can be made) and is a directory."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"DISTILL_STORAGE={self.root}: cannot use it ({exc})") from exc

    def put(self, key: str, source: Path) -> int:
        dest = self._path(key)
        source = Path(source)
        size = source.stat().st_size
        if source.absolute() == dest or (dest.exists() and source.samefile(dest)):
            return size
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # the store is on another file system than the scratch
                raise
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
            try:
                with open(source, "rb") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            source.unlink()
        fsync_dir(dest.parent)
        return size

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(dest.parent)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.url}/{key}")
        return path.read_bytes()

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.url}/{key}")
        yield path

    def size(self, key: str) -> int | None:
        try:
            info = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def read_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if start < 0:
            raise ValueError(f"read_range: negative start {start}")
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.url}/{key}")
        # Opened now, so a missing file is an error here rather than midway through a response.
        handle = open(path, "rb")  # noqa: SIM115 - closed by the generator
        return _read_file(handle, start, end)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a prefix")
        if not prefix.endswith("/"):
            removed = 0
            for obj in list(self.list(prefix)):
                with contextlib.suppress(FileNotFoundError):
                    self._path(obj.key).unlink()
                    removed += 1
            return removed
        # A whole directory: unfinished dot-files in it go too (nothing will finish them).
        top = self._path(prefix.rstrip("/"))
        if not top.is_dir():
            return 0
        removed = 0
        for directory, _, files in os.walk(top, topdown=False):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed += 1
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        return removed

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        _check_prefix(prefix)
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        if not start.is_dir():
            return
        for directory, dirs, files in os.walk(start):
            # Dot-names are temporary or scratch files (``.<id>.zip.part``), never objects.
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = Path(directory).relative_to(self.root).as_posix()
            for name in sorted(files):
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    info = os.stat(os.path.join(directory, name))
                except FileNotFoundError:
                    continue
                yield StoredObject(key=key, size=info.st_size, modified=info.st_mtime)

    def presign(self, key: str, *, seconds: int, filename: str) -> str | None:
        check_key(key)
        return None


def _read_file(handle: IO[bytes], start: int, end: int | None) -> Iterator[bytes]:
    with handle:
        handle.seek(start)
        left = None if end is None else end - start + 1
        while left is None or left > 0:
            chunk = handle.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


class S3Storage:
    """A bucket (and key prefix) on S3 or anything speaking its API (MinIO, R2, Ceph, ...)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        scratch: Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNKSIZE,
    ) -> None:
        import boto3
        import botocore.config
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            _check_prefix(self.prefix)
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self.scratch = Path(scratch)
        credentials: dict[str, str] = {}
        if access_key_id and secret_access_key:
            credentials = {
                "aws_access_key_id": access_key_id,
                "aws_secret_access_key": secret_access_key,
            }
        # A session of its own: boto3's default session is not safe to share across threads
        # while clients are being made.
        session = boto3.session.Session()
        self.client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=botocore.config.Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                **_checksum_options(botocore.config.Config),
            ),
            **credentials,
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> S3Storage:
        """The store ``DISTILL_STORAGE=s3://bucket/prefix`` names; ``options`` go to __init__."""
        bucket, prefix = _parse_s3(settings.storage or "")
        key_id = settings.s3_access_key_id
        secret = settings.s3_secret_access_key
        return cls(
            bucket,
            prefix,
            scratch=settings.data_dir,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=key_id.get_secret_value() if key_id else None,
            secret_access_key=secret.get_secret_value() if secret else None,
            **options,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.url} at {self.endpoint_url or 'AWS'})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"DISTILL_STORAGE={self.url}" + (
            f" at DISTILL_S3_ENDPOINT_URL={self.endpoint_url}" if self.endpoint_url else ""
        )

    def _error(self, exc: Exception, key: str | None = None) -> Exception:
        """The exception callers see for a boto3 one: FileNotFoundError or StorageError."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = _code(exc)
            if key is not None and code in ("NoSuchKey", "404", "NotFound"):
                return FileNotFoundError(f"{self.url}/{key}")
            # HEAD answers carry only a status: a 404 without a key in play is the bucket.
            if code in ("NoSuchBucket", "404", "NotFound"):
                return StorageError(f"{self._where()}: bucket {self.bucket!r} does not exist")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(
                    f"{self._where()}: access denied ({code}); check DISTILL_S3_ACCESS_KEY_ID "
                    "and DISTILL_S3_SECRET_ACCESS_KEY"
                )
            return StorageError(f"{self._where()}: {code} {error.get('Message', '')}".strip())
        if "NoSuchBucket" in str(exc):
            return StorageError(f"{self._where()}: bucket {self.bucket!r} does not exist")
        return StorageError(f"{self._where()}: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _calling(self, key: str | None = None) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, key) from exc

    def check(self) -> None:
        """Raise StorageError unless the bucket exists and these credentials may use it."""
        with self._calling():
            self.client.head_bucket(Bucket=self.bucket)

    def local_path(self, key: str) -> Path | None:
        check_key(key)
        return None

    def put(self, key: str, source: Path) -> int:
        source = Path(source)
        size = source.stat().st_size
        with self._calling():
            self.client.upload_file(str(source), self.bucket, self._key(key), Config=self.transfer)
        source.unlink()
        return size

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._calling():
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        with self._calling(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        return data

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        self.scratch.mkdir(parents=True, exist_ok=True)
        # A dot-name, so a sweep of the scratch directory never takes it for an archive.
        fd, name = tempfile.mkstemp(dir=self.scratch, prefix=".download-", suffix=".tmp")
        os.close(fd)
        path = Path(name)
        try:
            with self._calling(key):
                self.client.download_file(
                    self.bucket, self._key(key), str(path), Config=self.transfer
                )
            yield path
        finally:
            path.unlink(missing_ok=True)

    def size(self, key: str) -> int | None:
        try:
            with self._calling(key):
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    def read_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if start < 0:
            raise ValueError(f"read_range: negative start {start}")
        if end is not None and end < start:
            return iter(())
        options: dict[str, str] = {}
        if start or end is not None:
            options["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            with self._calling(key):
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **options)[
                    "Body"
                ]
        except StorageError as exc:
            # A start at or past the end: nothing to read, as from a local file.
            if _code(exc.__cause__) == "InvalidRange":
                return iter(())
            raise
        return _read_body(body)

    def delete(self, key: str) -> None:
        with self._calling():
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a prefix")
        keys = [obj.key for obj in self.list(prefix)]
        removed = 0
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            with self._calling():
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = answer.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{self._where()}: could not delete {first.get('Key')}: {first.get('Code')}"
                )
            removed += len(batch)
        return removed

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        with self._calling():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for item in page.get("Contents", []):
                    key = str(item["Key"])[len(root) :]
                    if not key or key.endswith("/"):
                        continue
                    yield StoredObject(
                        key=key, size=int(item["Size"]), modified=item["LastModified"].timestamp()
                    )

    def presign(self, key: str, *, seconds: int, filename: str) -> str | None:
        with self._calling():
            url: str = self.client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self._key(key),
                    "ResponseContentDisposition": attachment(filename),
                },
                ExpiresIn=seconds,
            )
        return url


def _checksum_options(config: Any) -> dict[str, str]:
    """Checksums only where an operation requires them (botocore 1.36+ adds them by default).

    Several S3-compatible stores send the whole object's checksum with a ranged GET, which
    botocore then rejects, or refuse the new upload checksums; archives carry their own
    SHA-256, which clients verify.
    """
    names = ("request_checksum_calculation", "response_checksum_validation")
    known = getattr(config, "OPTION_DEFAULTS", {})
    return {name: "when_required" for name in names if name in known}


def _code(exc: BaseException | None) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _parse_s3(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(f"DISTILL_STORAGE={url!r}: expected s3://bucket/prefix")
    return parts.netloc, unquote(parts.path)


def _read_body(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


class _RangeReader(io.RawIOBase):
    """A seekable file over ranged reads, so zipfile reads a member without the whole zip."""

    def __init__(self, storage: Storage, key: str, size: int) -> None:
        self._storage, self._key, self._size, self._pos = storage, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        end = min(self._pos + len(view), self._size) - 1
        n = 0
        for chunk in self._storage.read_range(self._key, self._pos, end):
            view[n : n + len(chunk)] = chunk
            n += len(chunk)
        self._pos += n
        return n


@contextlib.contextmanager
def open_object(storage: Storage, key: str) -> Iterator[IO[bytes]]:
    """A seekable, read-only file object over a stored object (FileNotFoundError if absent).

    Local objects are opened directly; remote ones are read in ranges on demand, so reading
    one member of a large zip costs a few small requests, not a download.
    """
    path = storage.local_path(key)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{storage.url}/{key}")
        with open(path, "rb") as handle:
            yield handle
        return
    size = storage.size(key)
    if size is None:
        raise FileNotFoundError(f"{storage.url}/{key}")
    with io.BufferedReader(_RangeReader(storage, key, size), buffer_size=256 * 1024) as handle:
        yield handle


_lock = threading.Lock()


def open_storage(settings: Settings) -> Storage:
    """The store ``settings`` name (one per configuration, shared by every caller)."""
    key_id = settings.s3_access_key_id
    secret = settings.s3_secret_access_key
    with _lock:
        return _open(
            settings.storage,
            settings.data_dir.absolute(),
            settings.s3_endpoint_url,
            settings.s3_region,
            key_id.get_secret_value() if key_id else None,
            secret.get_secret_value() if secret else None,
        )


@lru_cache(maxsize=16)
def _open(
    storage: str | None,
    data_dir: Path,
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
) -> Storage:
    if not storage:
        return LocalStorage(data_dir)
    parts = urlsplit(storage)
    if parts.scheme == "s3":
        bucket, prefix = _parse_s3(storage)
        return S3Storage(
            bucket,
            prefix,
            scratch=data_dir,
            endpoint_url=endpoint_url,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
        )
    if parts.scheme == "file":
        return LocalStorage(Path(unquote(parts.path)))
    if len(parts.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise StorageError(
            f"DISTILL_STORAGE={storage!r}: unsupported scheme {parts.scheme!r} "
            "(a directory, file:///dir or s3://bucket/prefix)"
        )
    return LocalStorage(Path(storage))
