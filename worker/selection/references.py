"""Reference sets on the worker: the images of a job's classes, as arrays, ready to select from.

``source(settings, reference_id=... | name=...)`` gives a local path to a stored set (fetched
from the store) or a named one (``DISTILL_REFERENCES_DIR``); ``load_for_classes(path,
classes, size=S)`` matches the job's classes to the set's folders (``core.references.match``)
and decodes each class into uint8 ``(N, S, S, 3)``.

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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core import keys
from core import references as records
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


@contextmanager
def source(
    settings: Settings, *, reference_id: str | None = None, name: str | None = None
) -> Iterator[Path]:
    """A local path to the stored set ``reference_id`` or the named set ``name`` (exactly
    one). A stored set is fetched to the data directory for as long as the block runs (a
    directory store hands out its own file). ValueError when there is no such set."""
    if (reference_id is None) == (name is None):
        raise ValueError("give exactly one of reference_id and name")
    if name is not None:
        path = records.named_path(settings.references_dir, name)
        if path is None:
            known = ", ".join(records.named_sets(settings.references_dir)) or "none"
            raise ValueError(f"no reference set named {name!r} (known: {known})")
        yield path
        return
    assert reference_id is not None
    storage = open_storage(settings)
    key = keys.reference_archive(reference_id)
    if storage.size(key) is None:
        raise ValueError(f"reference set {reference_id!r} is not in the store (expired?)")
    with storage.local_copy(key) as path:
        yield path


def folder_counts(path: Path) -> dict[str, int]:
    """``{class folder: image files}`` of a set, without decoding anything."""
    return {folder: len(files) for folder, files in records.members(path).items()}


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
    path: Path, folders: Sequence[str], *, size: int, threads: int | None = None
) -> list[ClassImages]:
    """The images of ``folders`` (in that order) of the set at ``path`` (a directory or a
    zip, stored or named), each class in digest order; ValueError for an unknown folder."""
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    found = records.members(path)
    unknown = [f for f in folders if f not in found]
    if unknown:
        raise ValueError(f"the reference set has no folder(s) {', '.join(map(repr, unknown))}")
    path = Path(path)
    archive = zipfile.ZipFile(path) if not path.is_dir() else None
    try:

        def read(member: str) -> bytes:
            if archive is not None:
                return archive.read(member)
            return (path / member).read_bytes()

        out = []
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            for folder in folders:
                by_digest: dict[str, bytes] = {}
                for member in found[folder]:
                    data = read(member)
                    by_digest.setdefault(hashlib.sha256(data).hexdigest(), data)
                digests = sorted(by_digest)
                blobs = [by_digest[d] for d in digests]
                arrays = list(pool.map(_square, blobs, [size] * len(blobs)))
                images = (
                    np.stack(arrays) if arrays else np.zeros((0, size, size, 3), dtype=np.uint8)
                )
                out.append(ClassImages(folder=folder, images=images, digests=tuple(digests)))
        return out
    finally:
        if archive is not None:
            archive.close()


def load_for_classes(
    path: Path, classes: Sequence[tuple[str, str | None]], *, size: int
) -> list[ClassImages]:
    """Each class ``(label, wnid)`` of a job, in the job's order, matched to its folder of the
    set (``core.references.match``: ValueError listing every class without one) and loaded."""
    folders = records.match(classes, folder_counts(path))
    return load(path, folders, size=size)
