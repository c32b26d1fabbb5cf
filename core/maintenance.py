"""The maintenance loop: the one place where the service looks after itself.

Every worker runs it (``worker.main``, every ``INTERVAL_S``), and so does every API process (a
background thread), so that a deployment whose workers are all busy or gone still reaps. A
lock per queue in Redis lets one process at a time do the shared part:

- reap: entries whose worker stopped beating leave RQ's started-job registry, and the
  failure callback (``core.failures``) re-queues or fails them;
- tend sharded jobs: fill their windows, enqueue an assembly a dead worker missed, end a
  canceled job whose shards have all stopped (``core.shards.tend``);
- prune the worker registry of workers that died without unregistering;
- sweep the archive store once every ``DISTILL_SWEEP_INTERVAL`` (a Redis key says when).

Each process also sweeps its own scratch directory on the same interval (partial files are
local to the machine that writes them). Reads of the API never do any of this.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

from redis import Redis
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty

from core import keys, retention, shards, workers
from core.settings import Settings
from core.storage import open_storage

log = logging.getLogger("distill.maintenance")

#: Seconds between two rounds in one process.
INTERVAL_S = 2.0
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def lock_seconds(settings: Settings) -> int:
    """How long the lock outlives a holder that died mid-round: one heartbeat TTL, the time a
    dead worker takes to count as dead anyway. A live holder extends it between steps."""
    return max(int(settings.heartbeat_ttl), 1)


def reap(redis: Redis, queue: str) -> None:
    """Hand entries of dead workers to the failure callback (RQ's registry cleanup)."""
    StartedJobRegistry(
        name=queue, connection=redis, death_penalty_class=TimerDeathPenalty
    ).cleanup()


def take_lock(redis: Redis, settings: Settings) -> str | None:
    """The queue's maintenance lock for one round, or None while another process holds it."""
    token = uuid.uuid4().hex
    lock = keys.maintenance_lock(settings.queue_name)
    return token if redis.set(lock, token, nx=True, ex=lock_seconds(settings)) else None


def run_once(redis: Redis, settings: Settings, *, scratch: Path | None = None) -> bool:
    """One round; True when this process held the lock and did the shared part.

    ``scratch``: this process's own directory of partial files to sweep (a worker's data
    directory), when the store sweep is due.
    """
    queue = settings.queue_name
    lock = keys.maintenance_lock(queue)
    hold = lock_seconds(settings)
    token = take_lock(redis, settings)
    if token is None:
        return False
    try:
        reap(redis, queue)
        redis.eval(_EXTEND, 1, lock, token, hold)
        shards.tend(redis, settings)
        redis.eval(_EXTEND, 1, lock, token, hold)
        workers.prune(redis, queue)
        due = max(int(settings.sweep_interval * 1000), 1)
        sweep_now = bool(redis.set(keys.sweep_due(queue), "1", nx=True, px=due))
    finally:
        redis.eval(_RELEASE, 1, lock, token)
    if sweep_now:
        # Outside the lock: a long sweep of a big store must not hold up reaping. The due key
        # keeps it to one process per interval.
        sweep(redis, settings, scratch=scratch)
    return True


def sweep(redis: Redis, settings: Settings, *, scratch: Path | None) -> list[str]:
    """Remove expired archives and orphaned parts from the store, and stale partial files."""
    return retention.sweep(
        redis,
        open_storage(settings),
        scratch if scratch is not None else settings.data_dir,
        stale_after=settings.heartbeat_ttl,
        downloads_after=settings.job_timeout,
    )


class Loop:
    """``run_once`` every ``interval`` seconds on a daemon thread, until ``stop``."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        interval: float = INTERVAL_S,
        scratch: Path | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.interval = interval
        self.scratch = scratch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)
        self._next_local_sweep = time.monotonic() + settings.sweep_interval

    def start(self) -> Loop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        """One round; a failure is logged and retried at the next one."""
        try:
            run_once(self.redis, self.settings, scratch=self.scratch)
        except Exception as exc:  # noqa: BLE001 - maintenance must outlive a bad round
            log.warning("maintenance round failed (%s)", exc)
        if self.scratch is not None and time.monotonic() >= self._next_local_sweep:
            # This machine's own partial files (another process may hold the store sweep).
            self._next_local_sweep = time.monotonic() + self.settings.sweep_interval
            try:
                retention.sweep_scratch(
                    self.redis, self.scratch, stale_after=self.settings.heartbeat_ttl
                )
            except Exception as exc:  # noqa: BLE001 - retried next interval
                log.warning("scratch sweep failed (%s)", exc)
