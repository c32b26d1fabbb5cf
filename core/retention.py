"""Retention sweep: delete archives past ``DISTILL_RESULT_TTL`` (with their preview and evaluated
manifest copy), shards of jobs that ended, and partial files nobody writes.

The maintenance loop (``core.maintenance``) runs it every ``DISTILL_SWEEP_INTERVAL`` seconds.
It is idempotent, so any number of processes sharing a store may sweep it. Stored objects are
found through the store's listing (local directory or bucket); partial files are in each
worker's data directory (and, for a directory store, beside the objects they become).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from redis import Redis

from core import keys, records, references
from core.records import JobRecord
from core.storage import LocalStorage, Storage

log = logging.getLogger(__name__)

#: The per-job objects at the store's root.
_JOB_OBJECT = re.compile(r"^(?P<job>[^/.]+)\.(?:zip|preview\.png|manifest\.json)$")
_PART = re.compile(r"^parts/(?P<job>[^/]+)/")
#: Files being written or waiting for upload: ``.<job>.zip.part`` and ``.<job>.zip.upload``,
#: and for shards ``.parts-<job>-<shard>.zip.part`` (and ``.upload``).
_SCRATCH = re.compile(
    r"^\.(?:(?P<shard>parts-)(?P<sjob>[^-/]+)-\d+|(?P<job>[^./]+))\.zip\.(?:part|upload)$"
)


def sweep(
    redis: Redis,
    storage: Storage,
    data_dir: Path,
    *,
    stale_after: float,
    downloads_after: float = 24 * 3600,
) -> list[str]:
    """Remove expired or orphaned archives (and their preview and manifest copy), stored
    reference sets whose record is gone, shards of
    jobs that are finished or unknown, partial files of jobs that are not running and
    untouched for ``stale_after`` seconds, and downloaded copies older than
    ``downloads_after``. Returns the keys and paths removed."""
    now = time.time()
    removed: list[str] = []
    seen: dict[str, JobRecord | None] = {}

    def record(job_id: str) -> JobRecord | None:
        if job_id not in seen:
            seen[job_id] = records.read(redis, job_id)
        return seen[job_id]

    with_parts: set[str] = set()
    for obj in storage.list():
        if match := _JOB_OBJECT.match(obj.key):
            found = record(match["job"])
            if found is None or found.expired(now):
                storage.delete(obj.key)
                removed.append(obj.key)
        elif match := _PART.match(obj.key):
            with_parts.add(match["job"])
    scratch_dirs = {Path(data_dir).absolute()}
    if isinstance(storage, LocalStorage):
        scratch_dirs.add(storage.root)
        # A shard still being written is only a dot-file there, which the listing skips.
        parts = storage.root / "parts"
        if parts.is_dir():
            with_parts.update(p.name for p in parts.iterdir() if p.is_dir())
    for job_id in sorted(with_parts):
        found = record(job_id)
        # Shards exist only to be joined into the archive; once the job ended, or is
        # forgotten, nobody will join them.
        if found is None or found.outcome is not None:
            prefix = keys.parts_prefix(job_id)
            if storage.delete_prefix(prefix):
                removed.append(prefix)

    # Reference sets whose record expired (or never completed) go the same way.
    removed += references.sweep(redis, storage)
    for directory in sorted(scratch_dirs):
        removed += sweep_scratch(
            redis, directory, stale_after=stale_after, downloads_after=downloads_after, now=now
        )
    if removed:
        log.info("retention sweep removed %d item(s)", len(removed), extra={"files": len(removed)})
    return removed


def sweep_scratch(
    redis: Redis,
    directory: Path,
    *,
    stale_after: float,
    downloads_after: float = 24 * 3600,
    now: float | None = None,
) -> list[str]:
    """Remove one directory's partial files of jobs that are not running and untouched for
    ``stale_after`` seconds, and downloaded copies older than ``downloads_after``."""
    now = now or time.time()
    removed: list[str] = []
    for path in directory.glob(".*.zip.*"):
        match = _SCRATCH.match(path.name)
        if match is None:
            continue
        # Read afresh: the job may have started since the listing above.
        found = records.read(redis, match["job"] or match["sjob"])
        # A whole job that was put back in the queue loses ``started_at``; its file is
        # left over. A shard's progress is kept elsewhere: its file lives as long as the job.
        running = (
            found is not None
            and found.outcome is None
            and (bool(match["shard"]) or found.started_at is not None)
        )
        try:
            idle = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if not running and idle > stale_after:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    # Archives fetched from an object store for assembly or evaluation, left by a worker
    # that died: nothing keeps one longer than a job may run.
    for path in directory.glob(".download-*.tmp"):
        try:
            idle = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if idle > downloads_after:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed
