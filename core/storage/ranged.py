"""Seekable reads of a stored object: local files directly, remote ones in ranges on demand."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from core.storage.base import Storage


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
