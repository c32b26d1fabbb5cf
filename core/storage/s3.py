"""An S3-compatible bucket (boto3, imported only when a bucket store is opened)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from core.settings import Settings

from core.storage.base import CHUNK, StorageError, StoredObject, attachment, check_key, check_prefix

#: Files above this size are uploaded in parts of ``MULTIPART_CHUNKSIZE``, several at once.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024


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
            check_prefix(self.prefix)
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
        bucket, prefix = parse_s3_url(settings.storage or "")
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
        check_prefix(prefix)
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


def parse_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(f"DISTILL_STORAGE={url!r}: expected s3://bucket/prefix")
    return parts.netloc, unquote(parts.path)


def _read_body(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()
