"""Fair places in the queue: callers take turns. No torch here.

RQ's queue is one Redis list, first in first out. Left alone, a caller who submits 200 jobs
at once would make everyone behind them wait for all 200. So each new entry (a job, or a
shard of a large job) is moved to its owner's *round*: an owner's first waiting entry is in
round 0, its second in round 1, and so on; the queue holds round 0 of every owner, then round
1, and so on, in arrival order within a round. A caller's first job therefore waits behind at
most one entry of each other caller, however many they queued. With one owner (no API keys)
this is plain FIFO. Entries that belong to no job (evaluations) count as their own owner.

Placing an entry is one read of the list and one move; a worker may dequeue meanwhile, which
only shortens the wait. It runs on submit and whenever a sharded job enqueues its next shard.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Callback, Retry

from core import keys
from core.settings import Settings


def enqueue_options(settings: Settings) -> dict[str, Any]:
    """RQ options every distill entry (a job, a shard, an assembly) is enqueued with."""
    return {
        "job_timeout": settings.job_timeout,
        "result_ttl": settings.result_ttl,
        "failure_ttl": settings.result_ttl,
        "on_failure": Callback(keys.ON_FAILURE),
        # Only a lost worker is retried: the tasks clear retries on their own errors.
        "retry": Retry(max=settings.max_attempts - 1) if settings.max_attempts > 1 else None,
    }


def place(redis: Redis, queue_key: str, entry: str, owner: str) -> int | None:
    """Move ``entry`` (already pushed at the end of ``queue_key``) to ``owner``'s round.

    Returns its new index, or None when a worker took it first (nothing to move).
    """
    raw: list[bytes] = redis.lrange(queue_key, 0, -1)  # type: ignore[assignment]
    entries = [e.decode() for e in raw]
    if entry not in entries:
        return None
    with redis.pipeline(transaction=False) as pipe:
        for other in entries:
            pipe.hget(keys.job(keys.parent_of(other)), "owner")
        owners = [
            (found.decode() if found is not None else f"?{other}")
            for other, found in zip(entries, pipe.execute(), strict=True)
        ]
    seen: dict[str, int] = {}
    rounds: list[int] = []
    for other, who in zip(entries, owners, strict=True):
        if other == entry:
            rounds.append(-1)
            continue
        rounds.append(seen.get(who, 0))
        seen[who] = seen.get(who, 0) + 1
    mine = seen.get(owner, 0)
    pivot = next(
        (other for other, r in zip(entries, rounds, strict=True) if r > mine and other != entry),
        None,
    )
    if pivot is None or entries.index(pivot) > entries.index(entry):
        return entries.index(entry)  # already in place (at the end)
    moved = int(redis.eval(_MOVE_LUA, 1, queue_key, entry, pivot))
    if moved < 0:
        return None  # a worker took the entry, or the pivot (then it went back to the end)
    position = redis.lpos(queue_key, entry)
    return int(position) if position is not None else None  # type: ignore[arg-type]


# Remove-and-insert in one step, only if the entry is still waiting: a worker must never see
# it twice, nor lose it.
_MOVE_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return -2 end
if redis.call('LINSERT', KEYS[1], 'BEFORE', ARGV[2], ARGV[1]) == -1 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  return -1
end
return 0
"""
