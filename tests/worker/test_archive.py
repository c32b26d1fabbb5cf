from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from worker.outputs.archive import ArchiveWriter, class_dir, image_name, slugify

HOSTILE = [
    "../../etc/passwd",
    "CON",
    "nul",
    "a\\b",
    "über größe",
    "猫",
    "🐱",
    "x" * 100,
    "..",
    "/",
    "com1",
    "a b",
    "a_b",
]


def test_slugs_are_safe_file_names() -> None:
    for label in HOSTILE:
        slug = slugify(label)
        assert slug and len(slug) <= 40
        assert all(c.isascii() and (c.isalnum() or c == "_") for c in slug), slug
        assert slug not in {"con", "nul", "com1", ".", ".."}


def test_class_folders_are_distinct_even_when_slugs_collide() -> None:
    folders = [class_dir(i, label) for i, label in enumerate(HOSTILE)]
    assert len(set(folders)) == len(folders)
    assert class_dir(0, "a b") != class_dir(1, "a_b")
    assert image_name(3, "dog", 12) == "003_dog/003_00012.png"


def test_commit_publishes_atomically_with_digest(tmp_path: Path) -> None:
    final, partial = tmp_path / "job.zip", tmp_path / ".job.zip.part"
    with ArchiveWriter(final=final, partial=partial) as writer:
        writer.add_image("000_a/000_00000.png", np.zeros((8, 8, 3), np.uint8), label=0)
        assert partial.exists() and not final.exists()
        info = writer.commit({"hello": "world"})
    assert final.exists() and not partial.exists()
    data = final.read_bytes()
    assert info.size_bytes == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert zipfile.ZipFile(final).namelist() == [
        "train/000_a/000_00000.png",
        "train/metadata.jsonl",
        "manifest.json",
    ]


def test_error_inside_the_block_leaves_no_file(tmp_path: Path) -> None:
    final, partial = tmp_path / "job.zip", tmp_path / ".job.zip.part"
    with pytest.raises(RuntimeError), ArchiveWriter(final=final, partial=partial) as writer:
        writer.add_image("000_a/000_00000.png", np.zeros((8, 8, 3), np.uint8))
        raise RuntimeError("boom")
    assert not final.exists() and not partial.exists()


def test_same_content_same_bytes(tmp_path: Path) -> None:
    digests = []
    for run in range(2):
        with ArchiveWriter(final=tmp_path / f"{run}.zip", partial=tmp_path / f"{run}.part") as w:
            w.add_image("000_a/000_00000.png", np.full((8, 8, 3), 7, np.uint8), label=0)
            digests.append(w.commit({"n": 1}).sha256)
    assert digests[0] == digests[1]
