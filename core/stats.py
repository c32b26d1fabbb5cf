"""Service-wide numbers kept in Redis, so the API can expose them for every worker. No torch.

Counters and histograms are plain Redis hashes updated with HINCRBY in the same pipelines
that record state changes; ``/metrics`` reads them on each scrape.

    distill:stats:counters          jobs_submitted, jobs_<outcome>, images_generated, images_written
    distill:stats:hist:<name>       b<i> (count in bucket i), sum, count
    distill:stats:last_job          images_per_second, seconds, images, finished_at
"""

from __future__ import annotations

import bisect

from redis.client import Pipeline

from core import keys

COUNTERS = keys.COUNTERS
LAST_JOB = keys.LAST_JOB

#: Upper bounds in seconds (the last bucket is +Inf).
BUCKETS: dict[str, tuple[float, ...]] = {
    "job_duration": (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
    "queue_wait": (0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 3600),
}


def incr(pipe: Pipeline, counter: str, amount: int = 1) -> None:
    pipe.hincrby(COUNTERS, counter, amount)


def observe(pipe: Pipeline, name: str, seconds: float) -> None:
    """Add one observation to histogram ``name``."""
    bounds = BUCKETS[name]
    index = bisect.bisect_left(bounds, seconds)
    key = keys.histogram(name)
    pipe.hincrby(key, f"b{index}", 1)
    pipe.hincrbyfloat(key, "sum", seconds)
    pipe.hincrby(key, "count", 1)


def last_job(pipe: Pipeline, *, images: int, seconds: float, finished_at: float) -> None:
    """The most recently finished job's throughput (shown by ``/metrics``)."""
    pipe.hset(
        LAST_JOB,
        mapping={
            "images_per_second": images / seconds,
            "seconds": seconds,
            "images": images,
            "finished_at": repr(finished_at),
        },
    )
