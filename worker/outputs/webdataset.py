"""WebDataset shards: tar files of ``<key>.png``, ``<key>.cls`` and ``<key>.json`` samples.

Layout inside the job's zip::

    webdataset/train-000000.tar          at most MAX_SAMPLES samples or MAX_BYTES bytes each
    webdataset/train-000001.tar          ...

A sample's key is ``<class index:03d>_<image number:05d>`` (``image_name`` without the class
folder and extension): unique, sortable and free of dots, since WebDataset splits a member's
name into key and extension at its first dot. Each sample holds the PNG the ImageFolder tree
holds, its class index as ASCII text and its ``train/metadata.jsonl`` line.

Samples stream into anonymous temporary files (no name on disk, so nothing is left behind by
a crash) as they come; the archive writer copies the finished tars into the zip on commit.
Tar headers are fixed (mtime 0, uid/gid 0, no owner names, mode 0644, USTAR), so the same
samples give the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: A shard holds at most this many samples ...
MAX_SAMPLES = 10_000
#: ... and at most this many bytes (a single larger sample still gets a shard of its own).
MAX_BYTES = 2**30
#: Zip folder of the shards.
FOLDER = "webdataset"
#: Tar bytes a sample adds beyond its PNG: three 512-byte headers, .cls, .json and padding.
OVERHEAD_BYTES = 1536

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def sample_key(index: int, number: int) -> str:
    """The WebDataset key of a class's ``number``-th image (``000_00003``)."""
    return f"{index:03d}_{number:05d}"


def shard_name(shard: int) -> str:
    """Zip member name of the ``shard``-th tar."""
    return f"{FOLDER}/train-{shard:06d}.tar"


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _closed_size(offset: int) -> int:
    """Size of a tar whose members end at ``offset``, once the end blocks and the record
    padding that ``TarFile.close`` writes are added."""
    return -(-(offset + 2 * _BLOCK) // _RECORD) * _RECORD


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def encode_sample(png: bytes, row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(extension, bytes) of one sample's members, in member order."""
    meta = json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return [("png", png), ("cls", str(int(row["label"])).encode("ascii")), ("json", meta)]


class ShardWriter:
    """Stream samples into tar shards, rolling over at ``max_samples`` or ``max_bytes``.

    Each shard is an anonymous ``TemporaryFile`` in ``directory`` (the system's temporary
    directory if None). ``shards()`` hands out the finished tars in order; ``close()`` drops
    them.
    """

    def __init__(
        self,
        *,
        directory: Path | None = None,
        max_samples: int = MAX_SAMPLES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("a shard must be allowed at least one sample and one byte")
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.directory = directory
        self._files: list[IO[bytes]] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._keys: set[str] = set()
        self.samples = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample: ``members`` are (extension, bytes), written in that order."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"a sample key must be non-empty, without dots or slashes: {key!r}")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} is already in the dataset")
        grows = sum(_BLOCK + _padded(len(data)) for _, data in members)
        tar = self._tar
        if tar is None or (
            self._in_shard >= self.max_samples or _closed_size(tar.offset + grows) > self.max_bytes
        ):
            tar = self._next_shard()
        for extension, data in members:
            tar.addfile(_member(f"{key}.{extension}", len(data)), io.BytesIO(data))
        self._keys.add(key)
        self._in_shard += 1
        self.samples += 1

    def _next_shard(self) -> tarfile.TarFile:
        self._finish_shard()
        handle = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115 - closed in shards/close
        self._files.append(handle)
        self._tar = tarfile.open(  # noqa: SIM115 - closed in _finish_shard/close
            fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT
        )
        self._in_shard = 0
        return self._tar

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()  # end blocks and padding; the file itself stays open
            self._tar = None

    @property
    def names(self) -> list[str]:
        """Zip member names of the shards so far (the last one may still grow)."""
        return [shard_name(i) for i in range(len(self._files))]

    def shards(self) -> Iterator[tuple[str, int, IO[bytes]]]:
        """Finish the last shard; yield (zip member name, size, file at offset 0) per shard,
        closing (so dropping) each file once the caller has moved on to the next."""
        self._finish_shard()
        for index, handle in enumerate(self._files):
            size = handle.seek(0, io.SEEK_END)
            handle.seek(0)
            yield shard_name(index), size, handle
            handle.close()

    def write_to(self, directory: Path) -> list[Path]:
        """Finish and copy every shard into ``directory`` as ``train-NNNNNN.tar``; returns the
        paths (for tests and local use; the archive writer uses ``shards``)."""
        paths = []
        for name, _, handle in self.shards():
            path = directory / Path(name).name
            with open(path, "wb") as out:
                shutil.copyfileobj(handle, out, 1 << 20)
            paths.append(path)
        return paths

    def close(self) -> None:
        """Drop every shard not yet handed out (an abort on a full disk must not fail here)."""
        with contextlib.suppress(OSError):
            if self._tar is not None:
                self._tar.close()
        self._tar = None
        for handle in self._files:
            handle.close()
        self._files.clear()

    def description(self) -> dict[str, Any]:
        """The manifest's entry for these shards."""
        return {
            "shards": self.names,
            "samples": self.samples,
            "members": "<key>.png (the PNG the ImageFolder tree holds, RGB uint8), <key>.cls "
            "(class index, ASCII), <key>.json (the image's train/metadata.jsonl line)",
            "keys": "<index>_<n>: class index and image number, zero-padded, no dots; samples "
            "in plan order (class-major for an ipc job, round by round for a budget job)",
            "shard_limits": {"samples": self.max_samples, "bytes": self.max_bytes},
            "load": 'webdataset.WebDataset(urls, shardshuffle=False).decode("pil"); '
            'datasets.load_dataset("webdataset", data_files={"train": urls})',
        }
