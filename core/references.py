"""Reference sets: real images a caller uploads (or an operator names) for real-image baselines.

An upload is a zip or a tar (plain, gz, bz2, xz) of an ImageFolder tree: class folders of
images, optionally under one top-level folder (``train/cat/1.png`` or ``cat/1.png``).
``ingest`` reads it without ever extracting by member name and writes a new, normalized zip::

    <class>/<sha256>.<ext>        the image's original bytes; ext from its content (png, jpg...)
    reference.json                classes, each image's digest, size and original member name

so nothing is ever written outside the set's own storage key. It refuses, naming the member:
absolute names, ``..``, backslashes or NUL in names (a zip name is judged as stored, before
Python cuts it at a NUL); symlinks, hardlinks, devices, FIFOs, sparse files; one name twice
with different content (``a/b.png`` and ``a//b.png``, NFC and NFD spellings, count as one
name); nested archives (by name or content); anything Pillow does not identify as an image of
an allowed format (``FORMATS``: content decides, not the extension); images over
``max_pixels`` (from the header, before any pixel is decoded); images whose file goes on after
the image ends (a PNG followed by a zip; ``_image_end`` gives each format's rule; up to
``_PADDING`` zero bytes of alignment may follow) or stops before; JPEGs of more than
``MAX_JPEG_SCANS`` scans (each one another decoding pass); images that do not decode
(each is decoded once, its first frame to RGB as jobs read it, a few at a time in a pool the
process shares); members over ``MAX_IMAGE_BYTES``; members the archive cannot give back
(corrupt deflate, LZMA or bzip2 data, a bad local header). As a whole, naming "the archive"
or the class folders: an archive too damaged to list (a bad central directory, an end record
pointing past the file, a name that is not UTF-8 under the UTF-8 flag, an unparseable tar or
pax header); more than ``max_bytes`` uncompressed (summed from the headers before any member
is read, and counted again while reading, so a lying header gains nothing; a tar header is
checked before the next one is looked for, so one declaring 10**15 bytes ends the upload at
once); more than ``max_images`` images, more than ``MAX_CLASSES`` classes, no image at all;
two class folders a job could not tell apart (``Cat`` and ``cat``, NFC and NFD ``crème``, one
wnid twice). Hidden entries (any path part starting with ``.``, ``__MACOSX``, ``Thumbs.db``,
``desktop.ini``) and directories are skipped, not refused: archivers add them unasked. An
image that appears twice in one class (same bytes) is kept once.

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
import threading
import time
import unicodedata
import uuid
import warnings
import zipfile
import zlib
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
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
#: What zipfile, tarfile and the decompressors raise on damaged input besides their own
#: errors: they do not wrap what their parsers hit (a bad offset, a name that is not UTF-8, a
#: pax number that is not one, corrupt deflate, LZMA or bzip2 data).
_DAMAGED: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
    RuntimeError,
    LookupError,
    OverflowError,
)
#: What Pillow raises on a file it cannot decode: its plugins parse hostile bytes and fail
#: in many ways, none of which means anything but "not a usable image".
_UNDECODABLE: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    LookupError,
    ArithmeticError,
    TypeError,
    NotImplementedError,
    RuntimeError,
)
#: Images decoded at once by one process (all uploads together), and how many one upload
#: keeps waiting: a decode holds up to ``max_pixels`` x 4 bytes and a core.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_DECODE_WINDOW = DECODE_THREADS + 1
_DECODE_WINDOW_BYTES = 128 * 1024 * 1024


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


def _why(exc: BaseException) -> str:
    """What a library said went wrong, for a refusal: never a server path (an OSError's file
    name is left out), one line."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextmanager
def _reading(member: str | None) -> Iterator[None]:
    """Refuse, naming ``member`` (None: the archive as a whole), what a library raises on
    damaged bytes; our own refusals pass through as they are."""
    try:
        yield
    except ReferenceSetError:
        raise
    except _DAMAGED as exc:
        if member is None:
            raise ReferenceSetError(f"the archive is damaged ({_why(exc)})") from None
        raise ReferenceSetError(f"cannot read it ({_why(exc)})", member=member) from None


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


class _Tail(io.RawIOBase):
    """A read-only stream that keeps the last bytes read, so that the block where tarfile
    stopped can be looked at afterwards: tarfile takes a damaged header after the first one
    for the end of the archive, silently dropping every member after it."""

    def __init__(self, inner: IO[bytes], keep: int = 1 << 16) -> None:
        self.inner = inner
        self.keep = keep
        self.pos = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.keep:
            del self.tail[: len(self.tail) - self.keep]
        buffer[: len(data)] = data
        return len(data)

    def block(self, offset: int) -> bytes | None:
        """The 512 bytes at ``offset`` (fewer at the end), None when no longer kept."""
        start = self.pos - len(self.tail)
        if offset < start:
            return None
        return bytes(self.tail[offset - start : offset - start + 512])


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
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) and _is_zip(path):
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


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except _DAMAGED:
        return False


def _plain_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:") as archive:
            archive.next()
        return True
    except _DAMAGED:
        return False


def _tar_stream(path: Path, kind: str, limit: int) -> IO[bytes]:
    opener: dict[str, Any] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
    if kind == "tar":
        return open(path, "rb")
    return io.BufferedReader(_Bounded(opener[kind](path, "rb"), limit), buffer_size=1 << 20)


def _tar_entries(
    archive: tarfile.TarFile, limit: int
) -> Iterator[tuple[tarfile.TarInfo, _Entry | None]]:
    """Each member with what to read of it (None: skipped), refusing what ``_check_totals``
    cannot wait for: a stream read moves to the next header by reading past this member's
    declared size, so a header claiming 10**15 bytes would keep it reading nothing for hours.
    Declared sizes (all members, skipped ones too) may add up to ``limit`` at most."""
    declared = 0
    for info in archive:
        if info.size < 0:
            raise ReferenceSetError("its header declares a negative size", member=info.name)
        declared += info.size
        if declared > limit:
            raise ReferenceTooLarge(
                f"its header declares {info.size} bytes; the whole archive may expand to "
                f"{limit} bytes at most",
                member=info.name,
            )
        parts = check_member_name(info.name)
        if info.issym() or info.islnk():
            raise ReferenceSetError("links are refused", member=info.name)
        if info.isdir() or parts is None:
            yield info, None
            continue
        if info.issparse():
            raise ReferenceSetError("sparse files are refused", member=info.name)
        if not info.isfile():
            raise ReferenceSetError(
                "devices, FIFOs and other special files are refused", member=info.name
            )
        yield info, _Entry(info.name, parts, info.size)


def _zip_entries(archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, _Entry]]:
    out = []
    for info in archive.infolist():
        # zipfile cuts a name at its first NUL (``cat/x.png\0../../evil`` reads as
        # ``cat/x.png``): the name as stored is the one judged.
        check_member_name(info.orig_filename)
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


# --- images: what they are, where they end, whether they decode --------------------------------


def identify(data: bytes, member: str, *, max_pixels: int) -> str:
    """The file extension for an image's bytes, from its content; ReferenceSetError naming
    ``member`` for anything else. The header decides the format and the size (within
    ``max_pixels``); the file must end where the format's structure ends (``_image_end``);
    then the image is decoded the way jobs read it (first frame, to RGB)."""
    extension = _inspect(data, member, max_pixels=max_pixels)
    _decode(data, member)
    return extension


def _inspect(data: bytes, member: str, *, max_pixels: int) -> str:
    """``identify`` up to the decoding: format, size and end, no pixel data decompressed."""
    if _looks_like_archive(member, data[:512]):
        raise ReferenceSetError("nested archives are refused", member=member)
    # Imported here: the API process loads Pillow only when an upload arrives.
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPENERS) as image:
                width, height = image.size
                kind = str(image.format)
                frames = int(getattr(image, "n_frames", 1)) if kind == "MPO" else 1
                # Chunk checksums and structure, still without decompressing pixel data.
                image.verify()
    except Image.DecompressionBombError as exc:
        raise ReferenceTooLarge(f"too many pixels ({exc})", member=member) from None
    except _UNDECODABLE as exc:  # UnidentifiedImageError is an OSError
        allowed = ", ".join(sorted(FORMATS))
        raise ReferenceSetError(f"not an image ({allowed}): {exc}", member=member) from None
    if width * height > max_pixels:
        raise ReferenceTooLarge(
            f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            member=member,
        )
    if width < 1 or height < 1 or kind not in FORMATS:
        raise ReferenceSetError(f"not a usable {kind} image ({width}x{height})", member=member)
    _check_end(data, kind, frames, member)
    return FORMATS[kind]


def _decode(data: bytes, member: str) -> None:
    """Decode the image as every job will (its first frame, to RGB): truncated or corrupt
    pixel data is refused now rather than failing each job that picks the image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=_OPENERS) as image:
            image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ReferenceTooLarge(f"too many pixels ({exc})", member=member) from None
    except _UNDECODABLE as exc:
        raise ReferenceSetError(f"the image does not decode ({_why(exc)})", member=member) from None


#: Zero bytes allowed after an image's end: writers align files (Pillow pads each page of a
#: multi-page TIFF to 16 bytes, cameras pad to a block); zeros carry nothing.
_PADDING = 4096
#: What ends each format (see ``_image_end``).
_ENDS = {
    "PNG": "IEND chunk",
    "JPEG": "end-of-image marker",
    "MPO": "last image's end-of-image marker",
    "GIF": "trailer",
    "WEBP": "RIFF chunk",
    "BMP": "pixel rows (or colour profile)",
    "TIFF": "furthest IFD, tag value, strip or tile",
    "PPM": "raster",
}


class _Malformed(ValueError):
    """An image whose structure does not hold together; the message says where."""


def _check_end(data: bytes, kind: str, frames: int, member: str) -> None:
    """Refuse an image whose file goes on after the image ends (a PNG followed by a zip) or
    stops before (a truncated structure)."""
    try:
        end = _image_end(data, kind, frames=frames)
    except (ValueError, IndexError, struct.error) as exc:  # _Malformed is a ValueError
        raise ReferenceSetError(f"not a well-formed {kind} image: {exc}", member=member) from None
    if end > len(data):
        raise ReferenceSetError(
            f"the {kind} image is cut short: its structure needs {end} bytes, the file has "
            f"{len(data)}",
            member=member,
        )
    extra = data[end:]
    if len(extra) > _PADDING or extra.strip(b"\x00"):
        raise ReferenceSetError(
            f"{len(extra)} bytes after the end of the {kind} image (its {_ENDS[kind]} must "
            "end the file) are refused",
            member=member,
        )


def _image_end(data: bytes, kind: str, *, frames: int = 1) -> int:
    """Where the image in ``data`` ends, by its format's own structure:

    - PNG: just after the IEND chunk, walking chunk lengths from the signature.
    - JPEG: just after the EOI marker, walking marker segments and scan data; MPO: after the
      EOI of the last of its ``frames`` JPEG streams, which follow one another.
    - GIF: just after the trailer (0x3B), walking blocks and sub-blocks.
    - WEBP: the end of the RIFF chunk (8 + its size), its chunks filling it exactly.
    - BMP: the end of the pixel rows (offset + padded rows, or offset + the declared size when
      compressed), or of an embedded colour profile placed after them.
    - TIFF (classic, not BigTIFF): the furthest byte any IFD reaches, with its tag values,
      strips, tiles and the IFDs it points to (next, sub-IFDs, EXIF, GPS).
    - PPM (netpbm P1-P6): the end of the raster (binary), or of the last sample (plain).
    """
    if kind in ("JPEG", "MPO"):
        pos = 0
        for _ in range(frames):
            pos = _jpeg_end(data, pos)
        return pos
    walkers = {
        "PNG": _png_end,
        "GIF": _gif_end,
        "WEBP": _webp_end,
        "BMP": _bmp_end,
        "TIFF": _tiff_end,
        "PPM": _ppm_end,
    }
    return walkers[kind](data)


def _png_end(data: bytes) -> int:
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos
    raise _Malformed("no IEND chunk ends it")


#: In JPEG scan data a 0xFF is a marker unless followed by 0x00 (stuffing) or RST0-7.
_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
#: Scans one JPEG may have: decoding time grows with scans x pixels, and encoders write one
#: (baseline) or about ten (progressive).
MAX_JPEG_SCANS = 100


def _jpeg_end(data: bytes, pos: int) -> int:
    """Just after the EOI marker of the JPEG stream that starts at ``pos``."""
    if data[pos : pos + 2] != b"\xff\xd8":
        raise _Malformed(f"no JPEG start-of-image marker at byte {pos}")
    pos += 2
    size = len(data)
    scans = 0
    while True:
        if pos >= size:
            raise _Malformed("it ends before its end-of-image marker")
        if data[pos] != 0xFF:
            raise _Malformed(f"no JPEG marker at byte {pos}")
        while pos < size and data[pos] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos >= size:
            raise _Malformed("it ends before its end-of-image marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # markers without a length
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise _Malformed(f"a JPEG segment of length {length} at byte {pos}")
        pos += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise _Malformed(f"more than {MAX_JPEG_SCANS} scans")
            found = _SCAN_MARKER.search(data, pos)
            if found is None:
                raise _Malformed("it ends inside its scan data")
            pos = found.start()


def _gif_end(data: bytes) -> int:
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while True:
        if pos >= len(data):
            raise _Malformed("it ends before its trailer")
        block = data[pos]
        if block == 0x3B:
            return pos + 1
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, data
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = _gif_sub_blocks(data, pos + 1)
        else:
            raise _Malformed(f"an unknown GIF block 0x{block:02x} at byte {pos}")


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise _Malformed("it ends inside a block")
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos


def _webp_end(data: bytes) -> int:
    end = 8 + int.from_bytes(data[4:8], "little")
    pos = 12
    while pos + 8 <= end:
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + length + (length & 1)
    if end > len(data):
        return end  # cut short
    # The last chunk's padding byte may be counted in the RIFF size or left out.
    if pos not in (end, end + 1):
        raise _Malformed("its chunks do not fill its RIFF chunk")
    return end


def _bmp_end(data: bytes) -> int:
    offset, header = struct.unpack_from("<II", data, 10)
    if header == 12:  # OS/2 1.x: 16-bit sizes, never compressed
        width, height, _, bits = struct.unpack_from("<HHHH", data, 18)
        compression = size = 0
    else:
        width, height, _, bits, compression, size = struct.unpack_from("<iiHHII", data, 18)
    if width < 1 or bits not in (1, 2, 4, 8, 16, 24, 32):
        raise _Malformed(f"{width} pixels wide at {bits} bits per pixel")
    if compression in (1, 2, 4, 5):  # RLE8, RLE4, JPEG, PNG: the declared size is the data
        if size == 0:
            raise _Malformed("compressed pixel data of undeclared size")
        end = offset + size
    else:
        end = offset + (width * bits + 31) // 32 * 4 * abs(height)
    if header >= 124 and struct.unpack_from("<I", data, 14 + 56)[0] == 0x4D424544:  # 'MBED'
        profile, length = struct.unpack_from("<II", data, 14 + 112)
        end = max(end, 14 + profile + length)
    return int(end)


_TIFF_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}
#: Tags whose values are offsets of more IFDs: sub-IFDs, EXIF, GPS, interoperability.
_TIFF_IFD_TAGS = frozenset({330, 34665, 34853, 40965})
#: (offsets, byte counts) tag pairs: strips, tiles, a JPEG thumbnail, free space.
_TIFF_EXTENTS = ((273, 279), (324, 325), (513, 514), (288, 289))
_TIFF_WANTED = _TIFF_IFD_TAGS | {tag for pair in _TIFF_EXTENTS for tag in pair}


def _tiff_end(data: bytes) -> int:
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    magic = struct.unpack_from(f"{order or '<'}H", data, 2)[0]
    if order is None or magic != 42:
        raise _Malformed("not a classic TIFF header (BigTIFF is not accepted)")
    end = 8
    todo = [struct.unpack_from(f"{order}I", data, 4)[0]]
    seen: set[int] = set()
    while todo:
        at = todo.pop()
        if at == 0 or at in seen:
            continue
        if len(seen) >= 1024:
            raise _Malformed("more than 1024 IFDs")
        seen.add(at)
        values, reach, following = _tiff_ifd(data, order, at)
        end = max(end, reach)
        for offsets, counts in _TIFF_EXTENTS:
            for start, length in zip(values.get(offsets, ()), values.get(counts, ()), strict=False):
                end = max(end, start + length)
        for tag in _TIFF_IFD_TAGS & values.keys():
            todo.extend(values[tag])
        todo.extend(following)
    return end


def _tiff_ifd(
    data: bytes, order: str, at: int
) -> tuple[dict[int, tuple[int, ...]], int, list[int]]:
    """One IFD: the values of the tags ``_tiff_end`` follows, the furthest byte the IFD and
    its tag values reach, and the IFDs it points to (the next one, IFD-typed tags)."""
    (count,) = struct.unpack_from(f"{order}H", data, at)
    reach = at + 2 + 12 * count + 4
    following = [struct.unpack_from(f"{order}I", data, reach - 4)[0]]
    values: dict[int, tuple[int, ...]] = {}
    for n in range(count):
        field = at + 2 + 12 * n
        tag, kind, number = struct.unpack_from(f"{order}HHI", data, field)
        size = _TIFF_TYPE_SIZES.get(kind, 1) * number
        start = struct.unpack_from(f"{order}I", data, field + 8)[0] if size > 4 else field + 8
        if start + size > len(data):
            raise _Malformed(f"tag {tag} points past the end of the file")
        reach = max(reach, start + size)
        if kind in (3, 4, 13) and (tag in _TIFF_WANTED or kind == 13):
            if number > 1 << 20:
                raise _Malformed(f"tag {tag} holds {number} offsets or counts")
            unpacked = struct.unpack_from(
                f"{order}{number}{'H' if kind == 3 else 'I'}", data, start
            )
            if kind == 13:
                following.extend(unpacked)
            else:
                values[tag] = unpacked
    return values, reach, following


_NETPBM_SPACE = b" \t\r\n\x0b\x0c"
_DIGITS = re.compile(rb"[0-9]+")


def _netpbm_skip(data: bytes, pos: int) -> int:
    """Past the whitespace and comments (``#`` to the end of the line) at ``pos``."""
    while pos < len(data):
        if data[pos] == 0x23:
            newline = data.find(b"\n", pos)
            pos = len(data) if newline < 0 else newline + 1
        elif data[pos] in _NETPBM_SPACE:
            pos += 1
        else:
            break
    return pos


def _ppm_end(data: bytes) -> int:
    kind = data[1] - 48 if data[:1] == b"P" and len(data) > 2 else 0
    if not 1 <= kind <= 6:
        raise _Malformed("only netpbm P1-P6 is accepted")
    fields: list[int] = []
    pos = 2
    while len(fields) < (2 if kind in (1, 4) else 3):
        pos = _netpbm_skip(data, pos)
        found = _DIGITS.match(data, pos)
        if found is None:
            raise _Malformed(f"its header holds no number at byte {pos}")
        if len(found[0]) > 9:
            raise _Malformed(f"a header number of {len(found[0])} digits")
        fields.append(int(found[0]))
        pos = found.end()
    width, height = fields[0], fields[1]
    maxval = fields[2] if len(fields) == 3 else 1
    samples = width * height * (3 if kind in (3, 6) else 1)
    if kind >= 4:  # binary: one whitespace byte, then the raster
        if pos >= len(data) or data[pos] not in _NETPBM_SPACE:
            raise _Malformed("no whitespace after its header")
        depth = 1 if maxval < 256 else 2
        row = (width + 7) // 8 if kind == 4 else width * depth * (3 if kind == 6 else 1)
        return pos + 1 + row * height
    if samples > len(data):
        raise _Malformed(f"{samples} samples cannot fit in {len(data)} bytes")
    # Plain: the samples as numbers (P1: digits 0 and 1) between whitespace. Possessive
    # quantifiers: a failed match never backtracks into the runs of digits.
    sample = rb"\s*+[01]" if kind == 1 else rb"\s*+[0-9]++"
    found = re.compile(rb"(?:%s){%d}\s*+" % (sample, samples)).match(data, pos)
    if found is None:
        raise _Malformed(f"it does not hold {samples} samples")
    return found.end()


# --- writing the normalized set ----------------------------------------------------------------


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

    def add(self, entry: _Entry, data: bytes, extension: str) -> None:
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
        self.waiting: deque[tuple[_Entry, bytes, str, Future[None]]] = deque()
        self.bytes = 0

    def add(self, entry: _Entry, data: bytes, extension: str) -> None:
        decoding = _decoders().submit(_decode, data, entry.name)
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
    _check_distinct(classes)
    return {member: folder for folder, members in classes.items() for member in members}


def _ingest_zip(source: Path, output: Path, limits: Limits) -> tuple[list[dict[str, Any]], int]:
    with _reading(None):
        archive = zipfile.ZipFile(source)
    with archive:
        pairs = _zip_entries(archive)
        entries = [e for _, e in pairs]
        _check_totals(entries, limits)
        writer = _Writer(output, _folders(entries))
        checked = _Checked(writer)
        try:
            left = limits.max_bytes
            for info, entry in pairs:
                with _reading(entry.name), archive.open(info) as handle:
                    data = _read_bounded(handle, entry, left)
                left -= len(data)
                extension = _inspect(data, entry.name, max_pixels=limits.max_pixels)
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
    with _reading(None):
        entries = _tar_headers(source, kind, expanded, limits)
    _check_totals(entries, limits)
    writer = _Writer(output, _folders(entries))
    checked = _Checked(writer)
    try:
        with closing(_tar_members(source, kind, expanded, limits)) as members:
            while True:
                # Only reading the archive is judged here: a failure to write the normalized
                # zip (a full disk) is ours, not the upload's.
                with _reading(None):
                    found = next(members, None)
                if found is None:
                    break
                entry, data = found
                checked.add(entry, data, _inspect(data, entry.name, max_pixels=limits.max_pixels))
        checked.finish()
        return writer.finish(), writer.bytes
    except BaseException:
        checked.abandon()
        writer.abort()
        raise


def _tar_headers(source: Path, kind: str, expanded: int, limits: Limits) -> list[_Entry]:
    """First pass: headers only (a stream read skips the data), so nothing is read into
    memory before the totals are known. The archive must end in a zero block (or at the end
    of the file), not at a header tarfile could not parse."""
    entries = []
    most = 2 * (limits.max_images + limits.max_classes) + 1000
    with _tar_stream(source, kind, expanded) as raw:
        tail = _Tail(raw)
        with tarfile.open(fileobj=tail, mode="r|") as archive:
            for headers, (_, entry) in enumerate(_tar_entries(archive, expanded), start=1):
                # Each header costs memory: stop at a count no acceptable set reaches.
                if headers > most:
                    raise ReferenceTooLarge(
                        f"more than {most} members; at most {limits.max_images} images"
                    )
                if entry is not None:
                    entries.append(entry)
            stop = archive.offset
        block = tail.block(stop)
        if block is None or block.strip(b"\x00"):
            raise ReferenceSetError(
                f"the archive is damaged (the block at byte {stop} is neither a tar header "
                "nor the end of the archive)"
            )
    return entries


def _tar_members(
    source: Path, kind: str, expanded: int, limits: Limits
) -> Generator[tuple[_Entry, bytes], None, None]:
    """Second pass: each image's entry and bytes, in archive order."""
    left = limits.max_bytes
    with (
        _tar_stream(source, kind, expanded) as raw,
        tarfile.open(fileobj=raw, mode="r|") as archive,
    ):
        for info, entry in _tar_entries(archive, expanded):
            if entry is None:
                continue
            with _reading(entry.name):
                handle = archive.extractfile(info)
                if handle is None:
                    raise ReferenceSetError("cannot read it", member=entry.name)
                data = _read_bounded(handle, entry, left)
            left -= len(data)
            yield entry, data


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


def members(path: Path | zipfile.ZipFile) -> dict[str, list[str]]:
    """``{class folder: [file, ...]}`` of an ImageFolder directory or zip (a named set or a
    stored one; a zip given open is read as it is, not opened again), by ``layout``'s rule,
    without decoding anything; files sorted by name. Entries are files relative to the
    directory, or zip member names. Files are taken by extension here: a named set is the
    operator's, not an upload."""
    if isinstance(path, zipfile.ZipFile):
        return _zip_members(path)
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
            return _zip_members(archive)
    else:
        raise ReferenceSetError(f"{path.name} is neither a directory nor a zip of class folders")
    return {folder: sorted(found) for folder, found in sorted(layout(files).items())}


def _zip_members(archive: zipfile.ZipFile) -> dict[str, list[str]]:
    files = []
    for entry in archive.namelist():
        checked = check_member_name(entry)
        if checked is not None and entry.lower().endswith(_IMAGE_SUFFIXES):
            files.append((entry, checked))
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
