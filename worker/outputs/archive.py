"""Streaming archive writer: an ImageFolder tree, ``metadata.jsonl`` and ``manifest.json`` in a zip.

Layout::

    train/000_cat/000_00000.png          class index, slug, image number within the class
    train/metadata.jsonl                 one line per image (Hugging Face imagefolder format)
    webdataset/train-000000.tar          WebDataset shards (worker/outputs/webdataset.py), if asked
    data/train-00000-of-00001.parquet    Parquet shards (worker/outputs/parquet.py), if asked
    manifest.json                        request, classes, model, versions, counts, timings

Images go straight into a temporary ``.part`` file as they are made; the archive appears
under its final name only after it is complete, flushed to disk and hashed. Members carry a
fixed timestamp so the same images give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import cv2
import numpy as np

from core.storage import fsync_dir
from worker.outputs.webdataset import ShardWriter, encode_sample

_EPOCH = (1980, 1, 1, 0, 0, 0)
_SLUG_CHARS = 40
#: Names Windows refuses as file names whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}


def slugify(label: str) -> str:
    """A safe, short, lowercase ASCII folder name for a label (never empty, never a path)."""
    ascii_text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:_SLUG_CHARS].strip("_")
    if not slug or slug in _RESERVED:
        slug = f"class_{slug}" if slug else "class"
    return slug


def class_dir(index: int, label: str) -> str:
    """``train/`` folder of a class; the index prefix keeps folders distinct and ordered."""
    return f"{index:03d}_{slugify(label)}"


def image_name(index: int, label: str, number: int) -> str:
    """Path of one image relative to ``train/``."""
    return f"{class_dir(index, label)}/{index:03d}_{number:05d}.png"


#: Formats that hold each image's PNG bytes.
PNG_FORMATS = frozenset({"imagefolder", "webdataset", "parquet"})


def wants_png(formats: Iterable[str]) -> bool:
    """Whether any of ``formats`` needs every image PNG-encoded."""
    return not PNG_FORMATS.isdisjoint(formats)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 uint8 RGB array.

    OpenCV's encoder: twice as fast as Pillow's at 32 px and it releases the GIL, so the
    post-processing threads encode in parallel. (It takes BGR, hence the channel flip.)
    """
    ok, buffer = cv2.imencode(
        ".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 6]
    )
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    return bytes(buffer)


def decode_png(data: bytes) -> np.ndarray:
    """An HxWx3 uint8 RGB array from PNG bytes (the inverse of ``encode_png``)."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a PNG image")
    return np.ascontiguousarray(image[..., ::-1])


class Shards(Protocol):
    """Files made beside the zip as images come (WebDataset tars, Parquet shards)."""

    def shards(self) -> Iterator[tuple[str, int, IO[bytes]]]:
        """(zip member name, size, file at offset 0) of each finished file, in order."""
        ...

    def close(self) -> None:
        """Drop the files not yet handed out."""
        ...


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    size_bytes: int
    sha256: str


class ArchiveWriter:
    """Write one job's archive to ``partial`` and publish it as ``final`` on ``commit()``.

    Use as a context manager: leaving the block without ``commit()`` (an error, a cancel)
    removes the partial file.
    """

    def __init__(self, *, final: Path, partial: Path) -> None:
        self.final = Path(final)
        self.partial = Path(partial)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.partial, mode="w", compression=zipfile.ZIP_STORED)
        # Metadata lines go to a temporary file as they come, so memory stays flat however
        # many images the job makes; they are copied into the zip on commit.
        self._metadata = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 - closed in commit/abort
        self._rows = 0
        # WebDataset shards stream into anonymous temporary files on the archive's volume
        # (they can be as large as the images); copied into the zip on commit as well.
        self.webdataset = ShardWriter(directory=self.partial.parent)
        # Other shard files the job's outputs make (Parquet); copied in after the tars.
        self._attached: list[Shards] = []
        self._committed = False

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            self.abort()

    def _write(self, name: str, data: bytes, *, compress: bool = False) -> None:
        info = zipfile.ZipInfo(name, date_time=_EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        self._zip.writestr(info, data)

    def _row(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._metadata.write(line.encode("utf-8"))
        self._rows += 1

    def add_image(self, file_name: str, image: np.ndarray, **metadata: Any) -> None:
        """Add ``train/<file_name>`` and its metadata line."""
        self.add_png(file_name, encode_png(image), **metadata)

    def add_png(self, file_name: str, png: bytes, **metadata: Any) -> None:
        """Add already-encoded ``train/<file_name>`` and its metadata line."""
        self._write(f"train/{file_name}", png)
        self._row({"file_name": file_name, **metadata})

    def add_sample(self, key: str, file_name: str, png: bytes, **metadata: Any) -> None:
        """Add one WebDataset sample ``<key>.png/.cls/.json``; its JSON is the metadata line
        ``add_png(file_name, png, **metadata)`` would write."""
        self.webdataset.add(key, encode_sample(png, {"file_name": file_name, **metadata}))

    def attach(self, shards: Shards) -> None:
        """Copy ``shards``' files into the zip on commit, after the WebDataset tars; drop
        them on abort."""
        self._attached.append(shards)

    def add_file(self, name: str, data: bytes, *, compress: bool = False) -> None:
        """Add another member (tensor files, say) at ``name``."""
        self._write(name, data, compress=compress)

    def commit(self, manifest: dict[str, Any]) -> ArchiveInfo:
        """Finish the zip, make it durable, hash it and move it to its final name."""
        if self._rows:
            info = zipfile.ZipInfo("train/metadata.jsonl", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            self._metadata.seek(0)
            with self._zip.open(info, mode="w") as member:
                shutil.copyfileobj(self._metadata, member, 1 << 20)
        self._metadata.close()
        for source in (self.webdataset, *self._attached):
            for name, size, handle in source.shards():
                info = zipfile.ZipInfo(name, date_time=_EPOCH)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                info.file_size = size  # decides zip64 up front
                with self._zip.open(info, mode="w") as member:
                    shutil.copyfileobj(handle, member, 1 << 20)
            source.close()
        manifest_bytes = json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
        self._write("manifest.json", manifest_bytes + b"\n", compress=True)
        self._zip.close()
        digest = hashlib.sha256()
        with open(self.partial, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            os.fsync(handle.fileno())
        size = self.partial.stat().st_size
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        self._committed = True
        return ArchiveInfo(path=self.final, size_bytes=size, sha256=digest.hexdigest())

    def abort(self) -> None:
        """Drop the partial archive."""
        try:
            self._metadata.close()
            for source in (self.webdataset, *self._attached):
                source.close()
            self._zip.close()
        finally:
            self.partial.unlink(missing_ok=True)

    @property
    def count(self) -> int:
        return self._rows
