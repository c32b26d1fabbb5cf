"""Reference sets on the worker: the images of a job's classes, as arrays, ready to select from.

``source(settings, reference_id=... | name=...)`` opens a stored set (its zip, opened once) or
gives the path of a named one (``DISTILL_REFERENCES_DIR``); ``load_for_classes(opened,
classes, size=S)`` matches the job's classes to the set's folders (``core.references.match``)
and decodes each class into uint8 ``(N, S, S, 3)``.

A stored set is opened when a piece of work starts (each shard's worker opens its own) and
read through that open file to the end: a set deleted meanwhile (``DELETE
/v1/references/{id}``, or expiry) is read as it was. One gone before it could be opened is a
``ReferenceUnavailable`` (the job fails as ``invalid_request``, naming the set, no path).

Every image is converted to RGB (alpha dropped, the first frame of an animation), cropped to
its centred square (the shorter side; nothing is stretched) and resized to ``S`` x ``S`` with
Pillow's bicubic filter (which antialiases when shrinking), the same filter the evaluator
uses for test images. Within a class, images are ordered by the sha256 of their file bytes
and a repeated file is kept once, so a stored set and the same images as a named directory
load identically, whatever the file names.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core import keys
from core.references.matching import match
from core.references.named import members, named_path, named_sets
from core.settings import Settings
from core.storage import open_storage


@dataclass(frozen=True)
class ClassImages:
    """One class of a reference set: its folder, images and their digests, in digest order."""

    folder: str
    images: np.ndarray  # uint8 (N, S, S, 3)
    digests: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.digests)


#: A set as ``source`` hands it out: a stored set's zip, open; a named set's path (a directory
#: or a zip, the operator's files).
OpenSet = zipfile.ZipFile | Path


class ReferenceUnavailable(ValueError):
    """The job's reference set is not there (deleted or expired before the job opened it, or
    no named set by that name). ``error_type`` is the public error type a job failing with it
    gets (``core.failures``): its request names a set that does not exist."""

    error_type = "invalid_request"


@contextmanager
def source(
    settings: Settings, *, reference_id: str | None = None, name: str | None = None
) -> Iterator[OpenSet]:
    """The stored set ``reference_id`` (its zip, open) or the named set ``name`` (its path),
    exactly one, for as long as the block runs. A stored set is opened here, once: a directory
    store's own file (a deletion only unlinks its name), or a download of this worker's own
    from an object store. ReferenceUnavailable when there is no such set."""
    if (reference_id is None) == (name is None):
        raise ValueError("give exactly one of reference_id and name")
    if name is not None:
        path = named_path(settings.references_dir, name)
        if path is None:
            known = ", ".join(named_sets(settings.references_dir)) or "none"
            raise ReferenceUnavailable(f"no reference set named {name!r} (known: {known})")
        yield path
        return
    assert reference_id is not None
    storage = open_storage(settings)
    with ExitStack() as stack:
        try:
            path = stack.enter_context(storage.local_copy(keys.reference_archive(reference_id)))
            handle = stack.enter_context(open(path, "rb"))
        except FileNotFoundError:
            # Its message would be the store's path: the caller needs the set's id.
            raise ReferenceUnavailable(
                f"reference set {reference_id!r} is not in the store (deleted or expired "
                "before this job could read it)"
            ) from None
        yield stack.enter_context(zipfile.ZipFile(handle))


def folder_counts(opened: OpenSet) -> dict[str, int]:
    """``{class folder: image files}`` of a set, without decoding anything."""
    return {folder: len(files) for folder, files in members(opened).items()}


def _square(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side))
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def load(
    opened: OpenSet, folders: Sequence[str], *, size: int, threads: int | None = None
) -> list[ClassImages]:
    """The images of ``folders`` (in that order) of a set (``source``'s, or the path of a
    directory or a zip), each class in digest order; ValueError for an unknown folder."""
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    found = members(opened)
    unknown = [f for f in folders if f not in found]
    if unknown:
        raise ValueError(f"the reference set has no folder(s) {', '.join(map(repr, unknown))}")
    with ExitStack() as stack:
        read = _reader(opened, stack)
        pool = stack.enter_context(
            ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1))
        )
        out = []
        for folder in folders:
            by_digest: dict[str, bytes] = {}
            for member in found[folder]:
                data = read(member)
                by_digest.setdefault(hashlib.sha256(data).hexdigest(), data)
            digests = sorted(by_digest)
            blobs = [by_digest[d] for d in digests]
            arrays = list(pool.map(_square, blobs, [size] * len(blobs)))
            images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), dtype=np.uint8)
            out.append(ClassImages(folder=folder, images=images, digests=tuple(digests)))
        return out


def _reader(opened: OpenSet, stack: ExitStack) -> Callable[[str], bytes]:
    """How to read a member: from the open zip, from a directory, or from a zip path (opened
    here and closed with ``stack``)."""
    if isinstance(opened, zipfile.ZipFile):
        return opened.read
    root = Path(opened)
    if root.is_dir():
        return lambda member: (root / member).read_bytes()
    return stack.enter_context(zipfile.ZipFile(root)).read


def load_for_classes(
    opened: OpenSet, classes: Sequence[tuple[str, str | None]], *, size: int
) -> list[ClassImages]:
    """Each class ``(label, wnid)`` of a job, in the job's order, matched to its folder of the
    set (``core.references.match``: ValueError listing every class without one) and loaded."""
    folders = match(classes, folder_counts(opened))
    return load(opened, folders, size=size)
