"""Retention sweep: delete archives past ``DISTILL_RESULT_TTL`` (with their preview and evaluated
manifest copy) and partial files nobody writes.

Workers run it every ``DISTILL_SWEEP_INTERVAL`` seconds. It is idempotent, so any number of
workers sharing a data directory may sweep it. No torch here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from redis import Redis

from worker import records

log = logging.getLogger(__name__)


def sweep(redis: Redis, data_dir: Path, *, stale_after: float) -> list[Path]:
    """Remove expired or orphaned archives, and partial files of jobs that are not running
    and untouched for ``stale_after`` seconds. Returns what was removed."""
    now = time.time()
    removed: list[Path] = []
    for path in Path(data_dir).glob("*.zip"):
        record = records.read(redis, path.stem)
        if not record or records.expired(record, now):
            path.unlink(missing_ok=True)
            records.preview_path(data_dir, path.stem).unlink(missing_ok=True)
            (Path(data_dir) / f"{path.stem}.manifest.json").unlink(missing_ok=True)
            removed.append(path)
    for path in Path(data_dir).glob(".*.zip.part"):
        job_id = path.name[1:].removesuffix(".zip.part")
        record = records.read(redis, job_id)
        running = bool(record) and "outcome" not in record and "started_at" in record
        try:
            idle = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if not running and idle > stale_after:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("retention sweep removed %d file(s)", len(removed), extra={"files": len(removed)})
    return removed
