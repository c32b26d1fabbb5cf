"""One worker per GPU without per-replica configuration: claim a free GPU through Redis.

When ``DISTILL_DEVICE`` is unset and several GPUs are visible (``docker compose up --scale
worker=N`` with all GPUs reserved for each replica), each worker claims the first GPU whose
claim key is free. Keys are named by the GPU's UUID, so they mean the same on every host and
in every container, and expire unless the owner's heartbeat refreshes them.
"""

from __future__ import annotations

import logging

import torch
from redis import Redis

log = logging.getLogger(__name__)

CLAIM_KEY = "distill:gpu:{}"


def _uuid(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return str(getattr(props, "uuid", f"index-{index}"))


class GpuClaim:
    """A held claim on one GPU; ``refresh()`` on every heartbeat, ``release()`` on exit."""

    def __init__(self, redis: Redis, *, index: int, key: str, owner: str, ttl: int) -> None:
        self.redis = redis
        self.index = index
        self.key = key
        self.owner = owner
        self.ttl = ttl

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    def refresh(self) -> None:
        self.redis.set(self.key, self.owner, ex=self.ttl)

    def release(self) -> None:
        if self.redis.get(self.key) == self.owner.encode():
            self.redis.delete(self.key)


def claim_free_gpu(redis: Redis, *, owner: str, ttl: int) -> GpuClaim | None:
    """Claim the first unclaimed visible GPU; None when there is no GPU or all are taken."""
    if not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        key = CLAIM_KEY.format(_uuid(index))
        if redis.set(key, owner, nx=True, ex=ttl):
            log.info("claimed GPU", extra={"device": f"cuda:{index}", "claim": key})
            return GpuClaim(redis, index=index, key=key, owner=owner, ttl=ttl)
    log.warning("every visible GPU is claimed by another worker; sharing cuda:0")
    return None
