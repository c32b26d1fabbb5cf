"""What every store is: the ``Storage`` protocol, its errors, and the rules for keys."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

if TYPE_CHECKING:
    pass

CHUNK = 1024 * 1024


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


def check_prefix(prefix: str) -> str:
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
