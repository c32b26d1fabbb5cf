"""The worker's side of reference sets: a stored set is opened once, so a set deleted while a
job reads it is read as it was, and one deleted before fails naming the set, not a path."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from core import keys, references
from core.failures import describe_failure
from core.settings import Settings
from core.states import ErrorType
from core.storage import open_storage
from service.redis_server import EmbeddedRedis
from tests.conftest import make_settings
from worker.selection import references as loader

OWNER = "worker-reference-tests"
CLASSES = [("cat", None), ("dog", None)]


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def stored(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[tuple[Settings, Redis, str]]:
    """A set of two classes stored the way the API stores uploads (a directory store)."""
    settings = make_settings(redis_server.url, tmp_path / "data")
    redis = Redis.from_url(redis_server.url)
    upload = tmp_path / "upload.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for n in range(3):
            archive.writestr(f"cat/{n}.png", _png((200, n, 0)))
            archive.writestr(f"dog/{n}.png", _png((0, n, 200)))
    normalized, info = references.ingest(
        upload, max_bytes=1 << 20, max_images=10, max_pixels=10_000, owner=OWNER
    )
    references.store(redis, open_storage(settings), normalized, info, ttl=600)
    yield settings, redis, info.id
    redis.close()


def _delete(settings: Settings, redis: Redis, reference_id: str) -> None:
    """What ``DELETE /v1/references/{id}`` does."""
    storage = open_storage(settings)
    assert references.delete(redis, storage, reference_id, owner=OWNER)
    assert storage.size(keys.reference_archive(reference_id)) is None  # really gone


def test_a_set_deleted_while_a_job_reads_it_is_read_as_it_was(
    stored: tuple[Settings, Redis, str],
) -> None:
    settings, redis, reference_id = stored
    with loader.source(settings, reference_id=reference_id) as opened:
        before = loader.load_for_classes(opened, CLASSES, size=4)
        _delete(settings, redis, reference_id)
        # As a prototypes job reads it: the folders, then one class at a time.
        counts = loader.folder_counts(opened)
        after = [loader.load(opened, [folder], size=4)[0] for folder in ("cat", "dog")]
    assert counts == {"cat": 3, "dog": 3}
    for a, b in zip(before, after, strict=True):
        assert a.digests == b.digests and np.array_equal(a.images, b.images)
    assert after[0].images.shape == (3, 4, 4, 3)


def test_a_set_deleted_before_a_job_opens_it_fails_naming_the_set(
    stored: tuple[Settings, Redis, str],
) -> None:
    settings, redis, reference_id = stored
    _delete(settings, redis, reference_id)
    with (
        pytest.raises(loader.ReferenceUnavailable) as caught,
        loader.source(settings, reference_id=reference_id),
    ):
        pass
    error_type, detail = describe_failure(type(caught.value), caught.value)
    assert error_type == ErrorType.invalid_request
    assert reference_id in detail and "deleted or expired" in detail
    assert str(settings.data_dir) not in detail and "/" not in detail
