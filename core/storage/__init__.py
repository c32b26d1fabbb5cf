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

``base`` (the protocol, errors, key rules), ``local`` (a directory), ``s3`` (a bucket) and
``ranged`` (seekable reads in ranges); ``open_storage`` picks one from the settings.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from core.settings import Settings

from core.storage.base import (
    CHUNK,
    Storage,
    StorageError,
    StoredObject,
    attachment,
    check_key,
    fsync_dir,
)
from core.storage.local import LocalStorage
from core.storage.ranged import open_object
from core.storage.s3 import S3Storage, parse_s3_url

__all__ = [
    "CHUNK",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoredObject",
    "attachment",
    "check_key",
    "fsync_dir",
    "open_object",
    "open_storage",
]


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
        bucket, prefix = parse_s3_url(storage)
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
