"""Reading an upload: what it is (zip, or tar plain, gz, bz2 or xz, from its first bytes),
its members and what their headers declare, refused before any member is read when the totals
are over the limits, then each member's bytes, never more than it declared nor than the
upload has left. Damaged input is refused naming the member, or "the archive" as a whole
(``reading``); nothing is ever extracted by member name."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from core.references.names import ARCHIVE_SUFFIXES, check_member_name, layout
from core.references.schema import Limits, ReferenceSetError, ReferenceTooLarge, UnsupportedArchive

#: One image file larger than this is not a photograph worth keeping, but a way to hold memory.
MAX_IMAGE_BYTES = 64 * 1024 * 1024


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


def why(exc: BaseException) -> str:
    """What a library said went wrong, for a refusal: never a server path (an OSError's file
    name is left out), one line."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextmanager
def reading(member: str | None) -> Iterator[None]:
    """Refuse, naming ``member`` (None: the archive as a whole), what a library raises on
    damaged bytes; our own refusals pass through as they are."""
    try:
        yield
    except ReferenceSetError:
        raise
    except _DAMAGED as exc:
        if member is None:
            raise ReferenceSetError(f"the archive is damaged ({why(exc)})") from None
        raise ReferenceSetError(f"cannot read it ({why(exc)})", member=member) from None


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
class Entry:
    """A member to read: name, path parts, declared size."""

    name: str
    parts: tuple[str, ...]
    size: int


def sniff(path: Path) -> str:
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
) -> Iterator[tuple[tarfile.TarInfo, Entry | None]]:
    """Each member with what to read of it (None: skipped), refusing what ``check_totals``
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
        yield info, Entry(info.name, parts, info.size)


def zip_entries(archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, Entry]]:
    """Each member to read, from the central directory; names, links, special files and
    encryption judged before anything is read."""
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
        out.append((info, Entry(info.filename, parts, info.file_size)))
    return out


def check_totals(entries: Sequence[Entry], limits: Limits) -> None:
    """Everything the headers alone say: names, nesting, sizes, counts, classes."""
    total = 0
    for entry in entries:
        if entry.name.lower().endswith(ARCHIVE_SUFFIXES):
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


def read_bounded(handle: IO[bytes], entry: Entry, budget: int) -> bytes:
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


def tar_headers(source: Path, kind: str, expanded: int, limits: Limits) -> list[Entry]:
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


def tar_members(
    source: Path, kind: str, expanded: int, limits: Limits
) -> Generator[tuple[Entry, bytes], None, None]:
    """Second pass: each image's entry and bytes, in archive order."""
    left = limits.max_bytes
    with (
        _tar_stream(source, kind, expanded) as raw,
        tarfile.open(fileobj=raw, mode="r|") as archive,
    ):
        for info, entry in _tar_entries(archive, expanded):
            if entry is None:
                continue
            with reading(entry.name):
                handle = archive.extractfile(info)
                if handle is None:
                    raise ReferenceSetError("cannot read it", member=entry.name)
                data = read_bounded(handle, entry, left)
            left -= len(data)
            yield entry, data
