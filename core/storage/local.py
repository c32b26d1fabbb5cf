"""A directory store (several machines may share it: NFS and the like)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    pass

from core.storage.base import CHUNK, StorageError, StoredObject, check_key, check_prefix, fsync_dir


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
        check_prefix(prefix)
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
