"""Named sets: operator files in ``DISTILL_REFERENCES_DIR``, found by name exactly as test
sets are (``core.evaluations.testset_path``): an ImageFolder directory or a zip of one, laid
out by the same rule as uploads (``layout``). A request never gives a path. Also what a job's
classes are checked against before it is enqueued (``folder_counts``), for named and stored
sets alike."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath

from redis import Redis

from core.evaluations import TESTSET_NAME, available_testsets, testset_path
from core.references.names import check_member_name, hidden, layout
from core.references.schema import ReferenceSetError
from core.references.stored import read

NAME = TESTSET_NAME


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
            dirs[:] = sorted(d for d in dirs if not hidden([d]))
            rel = PurePosixPath(Path(base).relative_to(path).as_posix())
            for file in sorted(names):
                parts = (*[p for p in rel.parts if p != "."], file)
                if not hidden(parts) and file.lower().endswith(_IMAGE_SUFFIXES):
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
