"""Stored sets: the record in Redis and the normalized zip in the store (``core.keys``)::

    distill:reference:<id>        hash   the set: name, owner, created_at, classes, counts, digest
    distill:references:<owner>    zset   one owner's set ids by creation time (listing)
    references/<id>.zip           the normalized zip, in the store

Both are kept ``ttl`` (``DISTILL_RESULT_TTL``) seconds, like archives; ``sweep`` removes
stored sets whose record expired."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path

from redis import Redis
from redis.typing import EncodableT, FieldT

from core import keys
from core.references.schema import ReferenceClass, ReferenceInfo
from core.storage import Storage

log = logging.getLogger("distill.references")


def _fields(info: ReferenceInfo, *, key: str, size: int) -> dict[FieldT, EncodableT]:
    return {
        "name": info.name or "",
        "owner": info.owner,
        "created_at": repr(info.created_at.timestamp()),
        "expires_at": repr(info.expires_at.timestamp()) if info.expires_at else "",
        "classes": json.dumps([c.model_dump() for c in info.classes], separators=(",", ":")),
        "images": info.images,
        "bytes": info.bytes,
        "digest": info.digest,
        "key": key,
        "size": size,
    }


def store(
    redis: Redis, storage: Storage, source: Path, info: ReferenceInfo, *, ttl: int
) -> ReferenceInfo:
    """Put the normalized zip ``source`` (moved, not copied, for a directory store) at
    ``references/<id>.zip`` and record the set for its owner, kept ``ttl`` seconds."""
    expires = info.created_at + dt.timedelta(seconds=ttl)
    info = info.model_copy(update={"expires_at": expires})
    key = keys.reference_archive(info.id)
    size = storage.put(key, source)
    now = info.created_at.timestamp()
    index = keys.references_index(info.owner)
    try:
        with redis.pipeline() as pipe:
            pipe.hset(keys.reference(info.id), mapping=_fields(info, key=key, size=size))
            pipe.expire(keys.reference(info.id), ttl)
            pipe.zadd(index, {info.id: now})
            pipe.zremrangebyscore(index, 0, time.time() - ttl)
            pipe.expire(index, ttl)
            pipe.execute()
    except BaseException:
        storage.delete(key)
        raise
    log.info(
        "reference set stored",
        extra={"reference_id": info.id, "images": info.images, "classes": len(info.classes)},
    )
    return info


def _parse(reference_id: str, raw: Mapping[bytes, bytes]) -> ReferenceInfo:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    expires = fields.get("expires_at")
    return ReferenceInfo(
        id=reference_id,
        name=fields.get("name") or None,
        owner=fields.get("owner", "public"),
        created_at=dt.datetime.fromtimestamp(float(fields["created_at"]), dt.UTC),
        expires_at=dt.datetime.fromtimestamp(float(expires), dt.UTC) if expires else None,
        classes=[ReferenceClass(**c) for c in json.loads(fields["classes"])],
        images=int(fields["images"]),
        bytes=int(fields["bytes"]),
        digest=fields["digest"],
    )


def read(redis: Redis, reference_id: str, *, owner: str | None = None) -> ReferenceInfo | None:
    """The set, or None when unknown, expired, or (with ``owner``) another owner's."""
    if not re.fullmatch(r"[0-9a-f]{32}", reference_id):
        return None
    raw: dict[bytes, bytes] = redis.hgetall(keys.reference(reference_id))  # type: ignore[assignment]
    if not raw or b"classes" not in raw:
        return None
    info = _parse(reference_id, raw)
    if owner is not None and info.owner != owner:
        return None
    return info


def list_for(redis: Redis, owner: str, *, limit: int = 1000) -> list[ReferenceInfo]:
    """The owner's sets, newest first (expired ones drop out)."""
    ids: list[bytes] = redis.zrevrange(keys.references_index(owner), 0, limit - 1)  # type: ignore[assignment]
    with redis.pipeline() as pipe:
        for raw_id in ids:
            pipe.hgetall(keys.reference(raw_id.decode()))
        found = pipe.execute()
    out = []
    for raw_id, raw in zip(ids, found, strict=True):
        if raw and b"classes" in raw:
            info = _parse(raw_id.decode(), raw)
            if info.owner == owner:
                out.append(info)
    return out


def delete(redis: Redis, storage: Storage, reference_id: str, *, owner: str) -> bool:
    """Remove the owner's set (record, index entry, stored zip); False when there is none."""
    info = read(redis, reference_id, owner=owner)
    if info is None:
        return False
    with redis.pipeline() as pipe:
        pipe.delete(keys.reference(reference_id))
        pipe.zrem(keys.references_index(owner), reference_id)
        pipe.execute()
    storage.delete(keys.reference_archive(reference_id))
    log.info("reference set deleted", extra={"reference_id": reference_id})
    return True


def sweep(redis: Redis, storage: Storage) -> list[str]:
    """Remove stored sets whose record is gone (expired or never completed)."""
    removed = []
    for obj in storage.list(keys.REFERENCES_PREFIX):
        match = re.fullmatch(r"references/([0-9a-f]{32})\.zip", obj.key)
        if match and not redis.exists(keys.reference(match[1])):
            storage.delete(obj.key)
            removed.append(obj.key)
    return removed
