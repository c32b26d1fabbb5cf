"""Reference sets: real images a caller uploads (or an operator names) for real-image baselines.

An upload is a zip or a tar (plain, gz, bz2, xz) of an ImageFolder tree: class folders of
images, optionally under one top-level folder (``train/cat/1.png`` or ``cat/1.png``).
``ingest`` reads it without ever extracting by member name and writes a new, normalized zip::

    <class>/<sha256>.<ext>        the image's original bytes; ext from its content (png, jpg...)
    reference.json                classes, each image's digest, size and original member name

so nothing is ever written outside the set's own storage key. It refuses, naming the member:
absolute names, ``..``, backslashes or NUL in names; symlinks, hardlinks, devices, FIFOs;
nested archives (by name or content); anything Pillow does not identify as an image of an
allowed format (``FORMATS``: content decides, not the extension); images over ``max_pixels``
(from the header, nothing decoded); members over ``MAX_IMAGE_BYTES``; and, as a whole, more
than ``max_bytes`` uncompressed (summed from the headers before any member is read, and
counted again while reading, so a lying header gains nothing), more than ``max_images``
images, more than ``MAX_CLASSES`` classes, no image at all. Hidden entries (any path part
starting with ``.``, ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``) and directories are
skipped, not refused: archivers add them unasked. An image that appears twice in one class
(same bytes) is kept once.

Records (``core.keys``)::

    distill:reference:<id>        hash   the set: name, owner, created_at, classes, counts, digest
    distill:references:<owner>    zset   one owner's set ids by creation time (listing)

and the normalized zip in the store at ``references/<id>.zip``. Both are kept ``ttl``
(``DISTILL_RESULT_TTL``) seconds, like archives; ``sweep`` removes stored sets whose record
expired.

Named sets are operator files in ``DISTILL_REFERENCES_DIR``, found by name exactly as test
sets are (``core.evaluations.testset_path``): an ImageFolder directory or a zip of one,
laid out by the same rule as uploads (``layout``). A request never gives a path.

``match`` maps a job's classes onto a set's folders (by wnid, else by name).
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import stat
import struct
import tarfile
import time
import unicodedata
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from redis.typing import EncodableT, FieldT

from core import keys
from core.evaluations import TESTSET_NAME, available_testsets, testset_path
from core.storage import Storage

log = logging.getLogger("distill.references")

MAX_CLASSES = 1000
#: One image file larger than this is not a photograph worth keeping, but a way to hold memory.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Pillow formats accepted (PostScript and the like are excluded: decoding them runs programs).
FORMATS: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpg",
    "MPO": "jpg",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
    "PPM": "ppm",
}
#: What Pillow is asked to try (an MPO file opens through the JPEG plugin).
_OPENERS = [f for f in FORMATS if f != "MPO"]
MANIFEST = "reference.json"
NAME = TESTSET_NAME
_HIDDEN_FILES = {"thumbs.db", "desktop.ini"}
_ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".tgz", ".tbz", ".tbz2", ".txz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst",
)  # fmt: skip
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf")
_WNID = re.compile(r"^(n\d{8})(?:[_\-\s.](.*))?$", re.IGNORECASE)
_INDEX_PREFIX = re.compile(r"^\d+[_\-\s.](?=.)")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class ReferenceSetError(ValueError):
    """An upload the service refuses. ``member`` names the archive member at fault (None for
    the archive as a whole); ``status`` is the HTTP status the API answers with."""

    status = 422

    def __init__(self, message: str, *, member: str | None = None) -> None:
        super().__init__(f"member {member!r}: {message}" if member is not None else message)
        self.member = member


class ReferenceTooLarge(ReferenceSetError):
    """Over a size limit: bytes, pixels, images (413)."""

    status = 413


class UnsupportedArchive(ReferenceSetError):
    """Neither a zip nor a tar (415)."""

    status = 415


class ReferenceClass(BaseModel):
    """One class folder of a set."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The class folder's name, as uploaded.")
    images: int = Field(description="Distinct images in the folder.")
    digest: str = Field(description="sha256 over the folder's image digests, sorted.")


class ReferenceInfo(BaseModel):
    """A stored reference set, as recorded in Redis and answered by the API."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None = Field(None, description="The uploader's label for the set, if any.")
    owner: str = Field("public", exclude=True)
    created_at: dt.datetime
    expires_at: dt.datetime | None = None
    classes: list[ReferenceClass]
    images: int = Field(description="Images over all classes.")
    bytes: int = Field(description="Bytes of image data (the original files) kept.")
    digest: str = Field(
        description="sha256 over every class name and image digest: same images, same digest."
    )


@dataclass(frozen=True)
class Limits:
    """What one upload may hold."""

    max_bytes: int
    max_images: int
    max_pixels: int
    max_classes: int = MAX_CLASSES


# --- names and layout --------------------------------------------------------------------------


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or (
        bool(parts) and parts[-1].lower() in _HIDDEN_FILES
    )


def check_member_name(name: str) -> tuple[str, ...] | None:
    """The path parts of a member name, None for one that is skipped (hidden); ReferenceSetError
    for a name that could point outside the set or that two systems would read differently."""
    if "\x00" in name or "\\" in name:
        raise ReferenceSetError("the name holds a NUL or a backslash", member=name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ReferenceSetError("absolute member names are refused", member=name)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ReferenceSetError("'..' in a member name is refused", member=name)
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise ReferenceSetError("control characters in a member name are refused", member=name)
    if not parts or _hidden(parts):
        return None
    return parts


def layout(files: Sequence[tuple[str, tuple[str, ...]]]) -> dict[str, list[str]]:
    """``{class folder: [member, ...]}`` for (member, parts) pairs of image files.

    The rule: when every file is at least three levels deep under one common top-level
    folder, that folder is the root and is dropped (``train/cat/1.png``); the first
    remaining level is the class. A file with no class folder above it is an error.
    """
    strip = (
        bool(files)
        and all(len(parts) >= 3 for _, parts in files)
        and len({parts[0] for _, parts in files}) == 1
    )
    classes: dict[str, list[str]] = {}
    for member, parts in files:
        rest = parts[1:] if strip else parts
        if len(rest) < 2:
            raise ReferenceSetError("an image must be inside a class folder", member=member)
        classes.setdefault(rest[0], []).append(member)
    return classes


def _looks_like_archive(name: str, head: bytes) -> bool:
    if name.lower().endswith(_ARCHIVE_SUFFIXES):
        return True
    return head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar"


# --- reading an upload -------------------------------------------------------------------------


class _Bounded(io.RawIOBase):
    """A read-only stream that fails once more than ``limit`` bytes came through: the guard
    on a compressed tar's decompressed size, whatever its headers say."""

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        self.count += len(data)
        if self.count > self.limit:
            raise ReferenceTooLarge(f"the archive expands to more than {self.limit} bytes")
        buffer[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class _Entry:
    """A member to read: name, path parts, declared size."""

    name: str
    parts: tuple[str, ...]
    size: int


def _sniff(path: Path) -> str:
    """What the upload is, from its first bytes. A zip must start with a zip header:
    ``zipfile`` alone would also take a tar whose last member is a zip for that zip."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) and zipfile.is_zipfile(path):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if len(head) == 512 and _plain_tar(path):
        return "tar"
    raise UnsupportedArchive("the body is neither a zip nor a tar (plain, gz, bz2 or xz)")


def _plain_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:") as archive:
            archive.next()
        return True
    except (tarfile.TarError, OSError):
        return False


def _tar_stream(path: Path, kind: str, limit: int) -> IO[bytes]:
    opener: dict[str, Any] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
    if kind == "tar":
        return open(path, "rb")
    return io.BufferedReader(_Bounded(opener[kind](path, "rb"), limit), buffer_size=1 << 20)


def _tar_entries(archive: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, _Entry | None]]:
    for info in archive:
        parts = check_member_name(info.name)
        if info.issym() or info.islnk():
            raise ReferenceSetError("links are refused", member=info.name)
        if info.isdir() or parts is None:
            yield info, None
            continue
        if not info.isfile():
            raise ReferenceSetError(
                "devices, FIFOs and other special files are refused", member=info.name
            )
        yield info, _Entry(info.name, parts, info.size)


def _zip_entries(archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, _Entry]]:
    out = []
    for info in archive.infolist():
        parts = check_member_name(info.filename)
        mode = info.external_attr >> 16
        if info.create_system == 3 and mode and stat.S_ISLNK(mode):
            raise ReferenceSetError("links are refused", member=info.filename)
        if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ReferenceSetError(
                "devices, FIFOs and other special files are refused", member=info.filename
            )
        if info.is_dir() or parts is None:
            continue
        if info.flag_bits & 0x1:
            raise ReferenceSetError("encrypted members are refused", member=info.filename)
        out.append((info, _Entry(info.filename, parts, info.file_size)))
    return out


def _check_totals(entries: Sequence[_Entry], limits: Limits) -> None:
    """Everything the headers alone say: names, nesting, sizes, counts, classes."""
    total = 0
    for entry in entries:
        if entry.name.lower().endswith(_ARCHIVE_SUFFIXES):
            raise ReferenceSetError("nested archives are refused", member=entry.name)
        if entry.size > MAX_IMAGE_BYTES:
            raise ReferenceTooLarge(
                f"{entry.size} bytes; one image may hold at most {MAX_IMAGE_BYTES}",
                member=entry.name,
            )
        total += entry.size
        if total > limits.max_bytes:
            raise ReferenceTooLarge(
                f"the members up to this one expand to {total} bytes, over the limit of "
                f"{limits.max_bytes}",
                member=entry.name,
            )
    if len(entries) > limits.max_images:
        raise ReferenceTooLarge(
            f"{len(entries)} files, over the limit of {limits.max_images} images",
            member=entries[limits.max_images].name,
        )
    classes = layout([(e.name, e.parts) for e in entries])
    if not classes:
        raise ReferenceSetError("the archive holds no images")
    if len(classes) > limits.max_classes:
        raise ReferenceSetError(
            f"{len(classes)} class folders, over the limit of {limits.max_classes}"
        )


def _read_bounded(handle: IO[bytes], entry: _Entry, budget: int) -> bytes:
    """The member's bytes; never more than it declared nor than the upload has left."""
    cap = min(entry.size, budget)
    data = handle.read(cap + 1)
    if len(data) > cap:
        if cap < entry.size:
            raise ReferenceTooLarge("the upload expands past its byte limit", member=entry.name)
        raise ReferenceSetError(
            "the member holds more bytes than its header says", member=entry.name
        )
    return data


def identify(data: bytes, member: str, *, max_pixels: int) -> str:
    """The file extension for an image's bytes, from its content (header only, nothing is
    decoded); ReferenceSetError naming ``member`` for anything else."""
    if _looks_like_archive(member, data[:512]):
        raise ReferenceSetError("nested archives are refused", member=member)
    # Imported here: the API process loads Pillow only when an upload arrives.
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPENERS) as image:
                width, height = image.size
                kind = str(image.format)
                # Chunk checksums and structure, still without decompressing pixel data.
                image.verify()
    except Image.DecompressionBombError as exc:
        raise ReferenceTooLarge(f"too many pixels ({exc})", member=member) from None
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        struct.error,
    ) as exc:
        allowed = ", ".join(sorted(FORMATS))
        raise ReferenceSetError(f"not an image ({allowed}): {exc}", member=member) from None
    if width * height > max_pixels:
        raise ReferenceTooLarge(
            f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            member=member,
        )
    if width < 1 or height < 1 or kind not in FORMATS:
        raise ReferenceSetError(f"not a usable {kind} image ({width}x{height})", member=member)
    return FORMATS[kind]


class _Writer:
    """The normalized zip being written: one image at a time, digests kept per class."""

    def __init__(self, target: Path, folder_of: Mapping[str, str]) -> None:
        self.zip = zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED)
        self.folder_of = folder_of
        self.images: dict[str, dict[str, dict[str, Any]]] = {
            c: {} for c in sorted(set(folder_of.values()))
        }
        self.bytes = 0

    def add(self, member: str, data: bytes, extension: str) -> None:
        folder = self.folder_of[member]
        digest = hashlib.sha256(data).hexdigest()
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
            "source": member,
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
    subclass) naming the member at fault; the output is then removed."""
    limits = Limits(max_bytes, max_images, max_pixels, max_classes)
    reference_id = reference_id or uuid.uuid4().hex
    source_path = Path(source_path)
    output = output or source_path.with_name(f".ref-{reference_id}.zip.part")
    kind = _sniff(source_path)
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


def _folders(entries: Sequence[_Entry]) -> dict[str, str]:
    classes = layout([(e.name, e.parts) for e in entries])
    for folder in classes:
        _check_folder(folder)
    return {member: folder for folder, members in classes.items() for member in members}


def _ingest_zip(source: Path, output: Path, limits: Limits) -> tuple[list[dict[str, Any]], int]:
    with zipfile.ZipFile(source) as archive:
        pairs = _zip_entries(archive)
        entries = [e for _, e in pairs]
        _check_totals(entries, limits)
        writer = _Writer(output, _folders(entries))
        try:
            left = limits.max_bytes
            for info, entry in pairs:
                try:
                    with archive.open(info) as handle:
                        data = _read_bounded(handle, entry, left)
                except (
                    zipfile.BadZipFile,
                    OSError,
                    RuntimeError,
                    EOFError,
                    NotImplementedError,
                ) as exc:
                    raise ReferenceSetError(f"cannot read it ({exc})", member=entry.name) from None
                left -= len(data)
                writer.add(
                    entry.name, data, identify(data, entry.name, max_pixels=limits.max_pixels)
                )
            return writer.finish(), writer.bytes
        except BaseException:
            writer.abort()
            raise


def _ingest_tar(
    source: Path, kind: str, output: Path, limits: Limits
) -> tuple[list[dict[str, Any]], int]:
    # Headers and padding cost at most ~1.5 KiB per member beyond the data itself.
    expanded = limits.max_bytes + 2048 * (limits.max_images + limits.max_classes + 64)
    try:
        # First pass: headers only (a stream read skips the data), so nothing is read into
        # memory before the totals are known.
        with (
            _tar_stream(source, kind, expanded) as raw,
            tarfile.open(fileobj=raw, mode="r|") as archive,
        ):
            entries = []
            most = 2 * (limits.max_images + limits.max_classes) + 1000
            for headers, (_, entry) in enumerate(_tar_entries(archive), start=1):
                # Each header costs memory: stop at a count no acceptable set reaches.
                if headers > most:
                    raise ReferenceTooLarge(
                        f"more than {most} members; at most {limits.max_images} images"
                    )
                if entry is not None:
                    entries.append(entry)
        _check_totals(entries, limits)
        folder_of = _folders(entries)
        writer = _Writer(output, folder_of)
        try:
            left = limits.max_bytes
            with (
                _tar_stream(source, kind, expanded) as raw,
                tarfile.open(fileobj=raw, mode="r|") as archive,
            ):
                for info, entry in _tar_entries(archive):
                    if entry is None:
                        continue
                    handle = archive.extractfile(info)
                    if handle is None:
                        raise ReferenceSetError("cannot read it", member=entry.name)
                    data = _read_bounded(handle, entry, left)
                    left -= len(data)
                    writer.add(
                        entry.name, data, identify(data, entry.name, max_pixels=limits.max_pixels)
                    )
            return writer.finish(), writer.bytes
        except BaseException:
            writer.abort()
            raise
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        raise ReferenceSetError(f"the tar archive is damaged ({exc})") from None


# --- records -----------------------------------------------------------------------------------


def _fields(info: ReferenceInfo, *, key: str, size: int) -> dict[FieldT, EncodableT]:
    return {
        "name": info.name or "",
        "owner": info.owner,
        "created_at": repr(info.created_at.timestamp()),
        "expires_at": repr(info.expires_at.timestamp()) if info.expires_at else "",
        "classes": json.dumps([c.model_dump() for c in info.classes], separators=(",", ":")),
        "images": info.images,
        "bytes": info.bytes,
        "digest": info.digest,
        "key": key,
        "size": size,
    }


def store(
    redis: Redis, storage: Storage, source: Path, info: ReferenceInfo, *, ttl: int
) -> ReferenceInfo:
    """Put the normalized zip ``source`` (moved, not copied, for a directory store) at
    ``references/<id>.zip`` and record the set for its owner, kept ``ttl`` seconds."""
    expires = info.created_at + dt.timedelta(seconds=ttl)
    info = info.model_copy(update={"expires_at": expires})
    key = keys.reference_archive(info.id)
    size = storage.put(key, source)
    now = info.created_at.timestamp()
    index = keys.references_index(info.owner)
    try:
        with redis.pipeline() as pipe:
            pipe.hset(keys.reference(info.id), mapping=_fields(info, key=key, size=size))
            pipe.expire(keys.reference(info.id), ttl)
            pipe.zadd(index, {info.id: now})
            pipe.zremrangebyscore(index, 0, time.time() - ttl)
            pipe.expire(index, ttl)
            pipe.execute()
    except BaseException:
        storage.delete(key)
        raise
    log.info(
        "reference set stored",
        extra={"reference_id": info.id, "images": info.images, "classes": len(info.classes)},
    )
    return info


def _parse(reference_id: str, raw: Mapping[bytes, bytes]) -> ReferenceInfo:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    expires = fields.get("expires_at")
    return ReferenceInfo(
        id=reference_id,
        name=fields.get("name") or None,
        owner=fields.get("owner", "public"),
        created_at=dt.datetime.fromtimestamp(float(fields["created_at"]), dt.UTC),
        expires_at=dt.datetime.fromtimestamp(float(expires), dt.UTC) if expires else None,
        classes=[ReferenceClass(**c) for c in json.loads(fields["classes"])],
        images=int(fields["images"]),
        bytes=int(fields["bytes"]),
        digest=fields["digest"],
    )


def read(redis: Redis, reference_id: str, *, owner: str | None = None) -> ReferenceInfo | None:
    """The set, or None when unknown, expired, or (with ``owner``) another owner's."""
    if not re.fullmatch(r"[0-9a-f]{32}", reference_id):
        return None
    raw: dict[bytes, bytes] = redis.hgetall(keys.reference(reference_id))  # type: ignore[assignment]
    if not raw or b"classes" not in raw:
        return None
    info = _parse(reference_id, raw)
    if owner is not None and info.owner != owner:
        return None
    return info


def list_for(redis: Redis, owner: str, *, limit: int = 1000) -> list[ReferenceInfo]:
    """The owner's sets, newest first (expired ones drop out)."""
    ids: list[bytes] = redis.zrevrange(keys.references_index(owner), 0, limit - 1)  # type: ignore[assignment]
    with redis.pipeline() as pipe:
        for raw_id in ids:
            pipe.hgetall(keys.reference(raw_id.decode()))
        found = pipe.execute()
    out = []
    for raw_id, raw in zip(ids, found, strict=True):
        if raw and b"classes" in raw:
            info = _parse(raw_id.decode(), raw)
            if info.owner == owner:
                out.append(info)
    return out


def delete(redis: Redis, storage: Storage, reference_id: str, *, owner: str) -> bool:
    """Remove the owner's set (record, index entry, stored zip); False when there is none."""
    info = read(redis, reference_id, owner=owner)
    if info is None:
        return False
    with redis.pipeline() as pipe:
        pipe.delete(keys.reference(reference_id))
        pipe.zrem(keys.references_index(owner), reference_id)
        pipe.execute()
    storage.delete(keys.reference_archive(reference_id))
    log.info("reference set deleted", extra={"reference_id": reference_id})
    return True


def sweep(redis: Redis, storage: Storage) -> list[str]:
    """Remove stored sets whose record is gone (expired or never completed)."""
    removed = []
    for obj in storage.list(keys.REFERENCES_PREFIX):
        match = re.fullmatch(r"references/([0-9a-f]{32})\.zip", obj.key)
        if match and not redis.exists(keys.reference(match[1])):
            storage.delete(obj.key)
            removed.append(obj.key)
    return removed


# --- named sets --------------------------------------------------------------------------------


def named_path(directory: Path | None, name: str) -> Path | None:
    """The operator's set called ``name`` in ``directory`` (a folder or ``name.zip``), or None;
    the same lookup as test sets."""
    return testset_path(directory, name)


def named_sets(directory: Path | None) -> list[str]:
    """Names of the sets in ``directory``."""
    return available_testsets(directory)


def members(path: Path) -> dict[str, list[str]]:
    """``{class folder: [file, ...]}`` of an ImageFolder directory or zip (a named set or a
    stored one), by ``layout``'s rule, without decoding anything; files sorted by name.
    Entries are files relative to the directory, or zip member names. Files are taken by
    extension here: a named set is the operator's, not an upload."""
    path = Path(path)
    files: list[tuple[str, tuple[str, ...]]] = []
    if path.is_dir():
        for base, dirs, names in os.walk(path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not _hidden([d]))
            rel = PurePosixPath(Path(base).relative_to(path).as_posix())
            for file in sorted(names):
                parts = (*[p for p in rel.parts if p != "."], file)
                if not _hidden(parts) and file.lower().endswith(_IMAGE_SUFFIXES):
                    files.append(("/".join(parts), parts))
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for entry in archive.namelist():
                checked = check_member_name(entry)
                if checked is not None and entry.lower().endswith(_IMAGE_SUFFIXES):
                    files.append((entry, checked))
    else:
        raise ReferenceSetError(f"{path.name} is neither a directory nor a zip of class folders")
    return {folder: sorted(found) for folder, found in sorted(layout(files).items())}


def folder_counts(
    redis: Redis,
    references_dir: Path | None,
    *,
    owner: str,
    reference_id: str | None = None,
    name: str | None = None,
) -> dict[str, int] | None:
    """``{class folder: images}`` of the owner's stored set ``reference_id`` (from its record)
    or of the named set ``name`` (from its files, nothing decoded); None when there is no
    such set. What the API checks a job's classes against (``match``) before enqueueing."""
    if (reference_id is None) == (name is None):
        raise ValueError("give exactly one of reference_id and name")
    if reference_id is not None:
        info = read(redis, reference_id, owner=owner)
        return None if info is None else {c.name: c.images for c in info.classes}
    assert name is not None
    path = named_path(references_dir, name)
    if path is None:
        return None
    return {folder: len(files) for folder, files in members(path).items()}


_IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)


# --- classes to folders ------------------------------------------------------------------------


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")


def folder_keys(folder: str) -> tuple[str | None, set[str]]:
    """(wnid, name keys) of a folder: ``n01440764_tench`` -> ("n01440764", {"tench"});
    ``000_airplane`` -> (None, {"000_airplane", "airplane"}); case, spaces and punctuation
    never matter."""
    text = folder.strip()
    found = _WNID.match(text)
    if found:
        rest = found[2] or ""
        return found[1].lower(), {_slug(rest)} - {""}
    names = {_slug(text), _slug(_INDEX_PREFIX.sub("", text))}
    return None, names - {""}


def match(
    classes: Sequence[tuple[str, str | None]],
    folders: Sequence[str] | Mapping[str, int],
) -> list[str]:
    """The folder of each class ``(label, wnid)``, in the classes' order.

    A class's folder is the one whose wnid is the class's wnid, else the one whose name is
    the label (after dropping a leading ``NNN_`` index or wnid). With ``folders`` as a
    ``{folder: image count}`` mapping, a folder without images counts as missing.
    ValueError lists every class that has no folder (or only an empty one), every class two
    folders claim, and every folder two classes claim.
    """
    counts = dict(folders) if isinstance(folders, Mapping) else None
    by_wnid: dict[str, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    for folder in folders:
        wnid, names = folder_keys(folder)
        if wnid:
            by_wnid.setdefault(wnid, []).append(folder)
        for name in names:
            by_name.setdefault(name, []).append(folder)
    chosen: list[str] = []
    missing: list[str] = []
    empty: list[str] = []
    ambiguous: list[str] = []
    for label, wnid in classes:
        candidates = by_wnid.get(wnid.lower(), []) if wnid else []
        if not candidates:
            candidates = by_name.get(_slug(label), [])
        unique = sorted(set(candidates))
        if not unique:
            missing.append(label if not wnid else f"{label} ({wnid})")
        elif len(unique) > 1:
            ambiguous.append(f"{label}: {', '.join(unique)}")
        elif counts is not None and counts.get(unique[0], 0) < 1:
            empty.append(f"{label} ({unique[0]})")
        else:
            chosen.append(unique[0])
            continue
        chosen.append("")
    problems = []
    if missing:
        problems.append(f"no folder for {len(missing)} class(es): {', '.join(missing)}")
    if empty:
        problems.append(f"no images for {len(empty)} class(es): {', '.join(empty)}")
    if ambiguous:
        problems.append(f"several folders match: {'; '.join(ambiguous)}")
    taken: dict[str, list[str]] = {}
    for (label, _), folder in zip(classes, chosen, strict=True):
        if folder:
            taken.setdefault(folder, []).append(label)
    shared = [f"{f}: {', '.join(labels)}" for f, labels in taken.items() if len(labels) > 1]
    if shared:
        problems.append(f"one folder for several classes: {'; '.join(shared)}")
    if problems:
        raise ValueError("; ".join(problems))
    return chosen
