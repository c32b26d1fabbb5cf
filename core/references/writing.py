"""Writing the normalized set: ``ingest`` reads an upload (``archives``), checks each image
(``images``: the header and end here, decoding a few at a time in a pool the process shares),
refuses class folders a job could not tell apart, and writes the new zip: each image's
original bytes at ``<class>/<sha256>.<ext>`` and ``reference.json``, in a fixed order with
fixed times, so the same images give the same bytes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import unicodedata
import uuid
import zipfile
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

from core.references.archives import (
    Entry,
    check_totals,
    read_bounded,
    reading,
    sniff,
    tar_headers,
    tar_members,
    zip_entries,
)
from core.references.images import decode_image, inspect_image
from core.references.matching import folder_keys
from core.references.names import layout
from core.references.schema import (
    MANIFEST,
    MAX_CLASSES,
    Limits,
    ReferenceClass,
    ReferenceInfo,
    ReferenceSetError,
)

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


#: Images decoded at once by one process (all uploads together), and how many one upload
#: keeps waiting: a decode holds up to ``max_pixels`` x 4 bytes and a core.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_DECODE_WINDOW = DECODE_THREADS + 1
_DECODE_WINDOW_BYTES = 128 * 1024 * 1024


class _Writer:
    """The normalized zip being written: one image at a time, digests kept per class."""

    def __init__(self, target: Path, folder_of: Mapping[str, str]) -> None:
        self.zip = zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED)
        self.folder_of = folder_of
        self.images: dict[str, dict[str, dict[str, Any]]] = {
            c: {} for c in sorted(set(folder_of.values()))
        }
        self.paths: dict[str, str] = {}
        self.bytes = 0

    def add(self, entry: Entry, data: bytes, extension: str) -> None:
        folder = self.folder_of[entry.name]
        digest = hashlib.sha256(data).hexdigest()
        # One path spelled twice (or two ways: NFC and NFD, a doubled slash) is one file once
        # extracted; with two contents, which image the set holds depends on the tool.
        path = unicodedata.normalize("NFC", "/".join(entry.parts))
        if self.paths.setdefault(path, digest) != digest:
            raise ReferenceSetError(
                "the archive holds this name twice, with different content", member=entry.name
            )
        if digest in self.images[folder]:
            return  # the same image twice in one class counts once
        file = f"{folder}/{digest}.{extension}"
        info = zipfile.ZipInfo(file, date_time=_ZIP_TIME)
        info.external_attr = 0o644 << 16
        self.zip.writestr(info, data)
        self.images[folder][digest] = {
            "sha256": digest,
            "file": file,
            "bytes": len(data),
            "source": entry.name,
        }
        self.bytes += len(data)

    def finish(self) -> list[dict[str, Any]]:
        classes = [
            {"name": name, "images": [found[d] for d in sorted(found)]}
            for name, found in sorted(self.images.items())
        ]
        info = zipfile.ZipInfo(MANIFEST, date_time=_ZIP_TIME)
        info.external_attr = 0o644 << 16
        body = json.dumps({"format": "distill-service/reference-v1", "classes": classes}, indent=1)
        self.zip.writestr(info, body.encode("utf-8") + b"\n")
        self.zip.close()
        return classes

    def abort(self) -> None:
        self.zip.close()


_decoders_lock = threading.Lock()
_decoders_pool: list[ThreadPoolExecutor] = []


def _decoders() -> ThreadPoolExecutor:
    """The process's image decoders (``DECODE_THREADS``), shared by every upload so that
    concurrent uploads cannot multiply the memory decoding takes; started on first use."""
    with _decoders_lock:
        if not _decoders_pool:
            _decoders_pool.append(
                ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="reference-decode")
            )
        return _decoders_pool[0]


class _Checked:
    """Images being decoded while the archive is read on, handed to the writer in member
    order once decoded (so a refusal names the first bad member); a few at a time."""

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self.waiting: deque[tuple[Entry, bytes, str, Future[None]]] = deque()
        self.bytes = 0

    def add(self, entry: Entry, data: bytes, extension: str) -> None:
        decoding = _decoders().submit(decode_image, data, entry.name)
        self.waiting.append((entry, data, extension, decoding))
        self.bytes += len(data)
        while len(self.waiting) > _DECODE_WINDOW or (
            len(self.waiting) > 1 and self.bytes > _DECODE_WINDOW_BYTES
        ):
            self._settle()

    def _settle(self) -> None:
        entry, data, extension, decoding = self.waiting.popleft()
        self.bytes -= len(data)
        decoding.result()
        self.writer.add(entry, data, extension)

    def finish(self) -> None:
        while self.waiting:
            self._settle()

    def abandon(self) -> None:
        """Drop what has not started and wait out what runs: nothing of a refused upload
        goes on once it is answered."""
        for *_, decoding in self.waiting:
            decoding.cancel()
        for *_, decoding in self.waiting:
            if not decoding.cancelled():
                decoding.exception()
        self.waiting.clear()


def _class_digest(shas: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{s}\n" for s in sorted(shas)).encode()).hexdigest()


def set_digest(classes: Sequence[ReferenceClass]) -> str:
    """sha256 over ``<class name>\\t<class digest>`` lines, classes sorted by name."""
    text = "".join(f"{c.name}\t{c.digest}\n" for c in sorted(classes, key=lambda c: c.name))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_folder(name: str) -> None:
    if len(name) > 200:
        raise ReferenceSetError("class folder names are at most 200 characters", member=name)
    if name == MANIFEST:
        raise ReferenceSetError(f"a class folder may not be called {MANIFEST}", member=name)


def _check_distinct(folders: Iterable[str]) -> None:
    """Refuse two class folders a job could not tell apart: names equal but for case,
    Unicode normalization or punctuation (``Cat`` and ``cat``, NFC and NFD ``crème``), or one
    wnid twice. ``match`` would answer every job on that class "several folders match"."""
    seen: dict[tuple[str, object], str] = {}
    for folder in sorted(folders):
        wnid, names = folder_keys(folder)
        marks: list[tuple[str, object]] = [
            ("name", unicodedata.normalize("NFKC", folder).casefold().strip())
        ]
        if wnid:
            marks.append(("wnid", wnid))
        elif names:
            marks.append(("keys", frozenset(names)))
        for mark in marks:
            other = seen.setdefault(mark, folder)
            if other != folder:
                raise ReferenceSetError(
                    f"class folders {other!r} and {folder!r}: a job could not tell them apart "
                    "(they differ only by case, Unicode normalization or punctuation, or "
                    "share a wnid)",
                    member=folder,
                )


def ingest(
    source_path: Path,
    *,
    max_bytes: int,
    max_images: int,
    max_pixels: int,
    output: Path | None = None,
    reference_id: str | None = None,
    name: str | None = None,
    owner: str = "public",
    max_classes: int = MAX_CLASSES,
) -> tuple[Path, ReferenceInfo]:
    """Validate the zip or tar at ``source_path`` and write its normalized zip to ``output``
    (default: beside the source, ``.ref-<id>.zip.part``). Returns the zip and its info
    (``created_at`` now, no ``expires_at`` until ``store``). Raises ``ReferenceSetError`` (or a
    subclass) naming the member at fault, or "the archive" when it is damaged as a whole; the
    output is then removed. Every image is decoded once (``identify``), a few at a time in a
    pool shared by the process."""
    limits = Limits(max_bytes, max_images, max_pixels, max_classes)
    reference_id = reference_id or uuid.uuid4().hex
    source_path = Path(source_path)
    output = output or source_path.with_name(f".ref-{reference_id}.zip.part")
    kind = sniff(source_path)
    try:
        if kind == "zip":
            classes, total = _ingest_zip(source_path, output, limits)
        else:
            classes, total = _ingest_tar(source_path, kind, output, limits)
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    summary = [
        ReferenceClass(
            name=c["name"],
            images=len(c["images"]),
            digest=_class_digest([i["sha256"] for i in c["images"]]),
        )
        for c in classes
    ]
    info = ReferenceInfo(
        id=reference_id,
        name=name,
        owner=owner,
        created_at=dt.datetime.now(dt.UTC),
        classes=summary,
        images=sum(c.images for c in summary),
        bytes=total,
        digest=set_digest(summary),
    )
    return output, info


def _folders(entries: Sequence[Entry]) -> dict[str, str]:
    classes = layout([(e.name, e.parts) for e in entries])
    for folder in classes:
        _check_folder(folder)
    _check_distinct(classes)
    return {member: folder for folder, members in classes.items() for member in members}


def _ingest_zip(source: Path, output: Path, limits: Limits) -> tuple[list[dict[str, Any]], int]:
    with reading(None):
        archive = zipfile.ZipFile(source)
    with archive:
        pairs = zip_entries(archive)
        entries = [e for _, e in pairs]
        check_totals(entries, limits)
        writer = _Writer(output, _folders(entries))
        checked = _Checked(writer)
        try:
            left = limits.max_bytes
            for info, entry in pairs:
                with reading(entry.name), archive.open(info) as handle:
                    data = read_bounded(handle, entry, left)
                left -= len(data)
                extension = inspect_image(data, entry.name, max_pixels=limits.max_pixels)
                checked.add(entry, data, extension)
            checked.finish()
            return writer.finish(), writer.bytes
        except BaseException:
            checked.abandon()
            writer.abort()
            raise


def _ingest_tar(
    source: Path, kind: str, output: Path, limits: Limits
) -> tuple[list[dict[str, Any]], int]:
    # Headers and padding cost at most ~1.5 KiB per member beyond the data itself.
    expanded = limits.max_bytes + 2048 * (limits.max_images + limits.max_classes + 64)
    with reading(None):
        entries = tar_headers(source, kind, expanded, limits)
    check_totals(entries, limits)
    writer = _Writer(output, _folders(entries))
    checked = _Checked(writer)
    try:
        with closing(tar_members(source, kind, expanded, limits)) as members:
            while True:
                # Only reading the archive is judged here: a failure to write the normalized
                # zip (a full disk) is ours, not the upload's.
                with reading(None):
                    found = next(members, None)
                if found is None:
                    break
                entry, data = found
                checked.add(
                    entry, data, inspect_image(data, entry.name, max_pixels=limits.max_pixels)
                )
        checked.finish()
        return writer.finish(), writer.bytes
    except BaseException:
        checked.abandon()
        writer.abort()
        raise
