"""Retention sweep: delete archives past ``DISTILL_RESULT_TTL`` (with their preview and evaluated
manifest copy), shards of jobs that ended, and partial files nobody writes.

Workers run it every ``DISTILL_SWEEP_INTERVAL`` seconds. It is idempotent, so any number of
workers sharing a store may sweep it. Stored objects are found through the store's listing
(local directory or bucket); partial files are each worker's own scratch in its data directory.
No torch here.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from redis import Redis

from worker import records
from worker.storage import Storage

log = logging.getLogger(__name__)

#: The per-job objects at the store's root.
_JOB_OBJECT = re.compile(r"^(?P<job>[^/.]+)\.(?:zip|preview\.png|manifest\.json)$")
_PART = re.compile(r"^parts/(?P<job>[^/]+)/")


def sweep(redis: Redis, storage: Storage, data_dir: Path, *, stale_after: float) -> list[str]:
    """Remove expired or orphaned archives (and their preview and manifest copy), shards of
    jobs that are finished or unknown, and partial files in ``data_dir`` of jobs that are not
    running and untouched for ``stale_after`` seconds. Returns the keys and paths removed."""
    now = time.time()
    removed: list[str] = []
    seen: dict[str, dict[str, str]] = {}

    def record(job_id: str) -> dict[str, str]:
        if job_id not in seen:
            seen[job_id] = records.read(redis, job_id)
        return seen[job_id]

    finished_parts: set[str] = set()
    for obj in storage.list():
        if match := _JOB_OBJECT.match(obj.key):
            found = record(match["job"])
            if not found or records.expired(found, now):
                storage.delete(obj.key)
                removed.append(obj.key)
        elif match := _PART.match(obj.key):
            found = record(match["job"])
            # Shards exist only to be joined into the archive; once the job ended, or is
            # forgotten, nobody will join them.
            if not found or "outcome" in found:
                finished_parts.add(match["job"])
    for job_id in sorted(finished_parts):
        prefix = f"parts/{job_id}/"
        if storage.delete_prefix(prefix):
            removed.append(prefix)

    for path in Path(data_dir).glob(".*.zip.part"):
        job_id = path.name[1:].removesuffix(".zip.part")
        found = records.read(redis, job_id)
        running = bool(found) and "outcome" not in found and "started_at" in found
        try:
            idle = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if not running and idle > stale_after:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    if removed:
        log.info("retention sweep removed %d item(s)", len(removed), extra={"files": len(removed)})
    return removed
