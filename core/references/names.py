"""Member names and the folder layout: which names are refused, which are skipped (hidden),
and which folder is an image's class (``layout``, the rule uploads and named sets share)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from core.references.schema import ReferenceSetError

_HIDDEN_FILES = {"thumbs.db", "desktop.ini"}
ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".tgz", ".tbz", ".tbz2", ".txz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst",
)  # fmt: skip
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf")


def hidden(parts: Sequence[str]) -> bool:
    """Whether a path is one archivers add unasked (dot entries, ``__MACOSX``, ``Thumbs.db``,
    ``desktop.ini``): skipped, not refused."""
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
    if not parts or hidden(parts):
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


def looks_like_archive(name: str, head: bytes) -> bool:
    """Whether a member is an archive itself, by its name or its first bytes."""
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return True
    return head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar"
