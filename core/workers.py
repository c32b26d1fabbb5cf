"""The worker registry: which workers serve a queue, and what each one says of itself.

As RQ's own worker registration does, a set per queue names its workers
(``distill:workers:<queue>``), and each worker's status hash (``distill:worker:<name>``)
expires unless the worker beats. Readers take the set and the hashes in one pipeline and
skip names whose hash has expired; removing such names is maintenance (``prune``), never
done by a read. Every reader (``/readyz``, ``/metrics``, sharding, the operator page) uses
``live``, so a worker of another deployment on the same Redis is never counted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.typing import EncodableT, FieldT

from core import keys

READY = "ready"
LOADING = "loading"


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's last published status."""

    name: str
    state: str
    model: str
    queue: str
    last_heartbeat: float
    device: str | None = None
    pid: int | None = None
    current_job: str | None = None
    images_per_second: float | None = None
    gpu_memory_bytes: int | None = None
    batch_size: int | None = None
    decoders: tuple[str, ...] = ()
    #: ``select`` scorers it can run (``reference`` always; ``clip`` once loaded).
    scorers: tuple[str, ...] = ()
    #: The pretrained soft-label teachers it loaded: name (as DISTILL_TEACHERS writes it) ->
    #: the digest of its class names (``teacher_labels``).
    teachers: dict[str, str] = field(default_factory=dict)
    compile: str | None = None
    compile_seconds: float | None = None
    #: Optional parts (the tiny decoder, the CLIP scorer) it could not load, with why.
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == READY

    def age(self, now: float | None = None) -> float:
        return max((now or time.time()) - self.last_heartbeat, 0.0)

    @classmethod
    def parse(cls, fields: Mapping[str, str]) -> WorkerInfo:
        def number(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value not in (None, "", "None") else None

        memory = number("gpu_memory_bytes")
        batch = number("batch_size")
        pid = fields.get("pid")
        return cls(
            name=fields.get("name", ""),
            state=fields.get("state", "unknown"),
            model=fields.get("model", ""),
            queue=fields.get("queue", ""),
            last_heartbeat=float(fields.get("last_heartbeat", 0.0)),
            device=fields.get("device"),
            pid=int(pid) if pid else None,
            current_job=fields.get("current_job") or None,
            images_per_second=number("images_per_second"),
            gpu_memory_bytes=int(memory) if memory is not None else None,
            batch_size=int(batch) if batch is not None else None,
            decoders=tuple(d for d in fields.get("decoders", "").split(",") if d),
            scorers=tuple(d for d in fields.get("scorers", "").split(",") if d),
            teachers=_string_map(fields.get("teachers")),
            compile=fields.get("compile"),
            compile_seconds=number("compile_seconds"),
            unavailable=_string_map(fields.get("unavailable")),
        )


def _string_map(text: str | None) -> dict[str, str]:
    """A JSON object of strings (the ``unavailable`` reasons, the ``teachers``); {} when it is
    anything else."""
    try:
        found = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def publish_teacher_labels(redis: Redis, labels: list[str]) -> str:
    """Store a teacher's class names under their digest (admission matches a job's classes
    to them); returns the digest. Content-addressed, so it never goes stale."""
    text = json.dumps(labels, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    redis.set(keys.teacher_labels(digest), text)
    return digest


def teacher_labels(redis: Redis, digest: str) -> list[str] | None:
    """The class names stored under ``digest``; None when there are none."""
    text = redis.get(keys.teacher_labels(digest))
    if text is None:
        return None
    found = json.loads(text)
    return [str(label) for label in found] if isinstance(found, list) else None


def publish(redis: Redis, name: str, *, queue: str, fields: Mapping[str, Any], ttl: float) -> None:
    """Write the worker's status (expiring after ``ttl`` seconds) and register it."""
    mapping: dict[FieldT, EncodableT] = {
        k: json.dumps(v) if isinstance(v, dict) else str(v)
        for k, v in fields.items()
        if v is not None
    }
    mapping["name"] = name
    mapping["queue"] = queue
    mapping["last_heartbeat"] = repr(time.time())
    with redis.pipeline() as pipe:
        pipe.hset(keys.worker(name), mapping=mapping)
        pipe.expire(keys.worker(name), max(int(ttl), 1))
        pipe.sadd(keys.workers(queue), name)
        pipe.execute()


def unregister(redis: Redis, name: str, *, queue: str) -> None:
    with redis.pipeline() as pipe:
        pipe.delete(keys.worker(name))
        pipe.srem(keys.workers(queue), name)
        pipe.execute()


def live(redis: Redis, queue: str, *, heartbeat_ttl: float) -> list[WorkerInfo]:
    """Workers of ``queue`` that beat within ``heartbeat_ttl`` seconds, by name."""
    members: set[bytes] = redis.smembers(keys.workers(queue))  # type: ignore[assignment]
    names = sorted(m.decode() for m in members)
    if not names:
        return []
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.worker(name))
        rows: list[dict[bytes, bytes]] = pipe.execute()
    now = time.time()
    found = []
    for row in rows:
        if not row:
            continue
        info = WorkerInfo.parse({k.decode(): v.decode() for k, v in row.items()})
        if info.queue == queue and info.age(now) <= heartbeat_ttl:
            found.append(info)
    return found


def ready_count(redis: Redis, queue: str, *, heartbeat_ttl: float) -> int:
    """Workers of ``queue`` with their model loaded, beating."""
    return sum(w.ready for w in live(redis, queue, heartbeat_ttl=heartbeat_ttl))


def prune(redis: Redis, queue: str) -> int:
    """Drop names whose status expired (the worker died without unregistering)."""
    members: set[bytes] = redis.smembers(keys.workers(queue))  # type: ignore[assignment]
    names = sorted(m.decode() for m in members)
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(keys.worker(name))
        alive = pipe.execute()
    gone = [name for name, exists in zip(names, alive, strict=True) if not exists]
    if gone:
        redis.srem(keys.workers(queue), *gone)
    return len(gone)
