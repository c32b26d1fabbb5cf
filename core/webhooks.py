"""Webhook events of a job: where they may go, how they are signed, and their queue entry.

The API checks a ``callback_url`` and records it; whoever ends the job enqueues its event on
``DISTILL_WEBHOOK_QUEUE_NAME``; ``python -m service.webhooks`` (no GPU) delivers it. Events
are signed per Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
v1,<base64 HMAC-SHA256>``) with ``DISTILL_WEBHOOK_SECRET`` and retried with exponential
backoff for up to ``DISTILL_WEBHOOK_RETRY_SECONDS``. Every attempt is recorded on the job.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from redis import Redis
from rq import Queue, Retry

from core import keys
from core.settings import Settings

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


class WebhookRefused(ValueError):
    """The callback URL points somewhere the service will not call."""


def queue_name(settings: Settings) -> str:
    return settings.webhook_queue_name


def secret_bytes(secret: str) -> bytes:
    """A Standard Webhooks secret: ``whsec_<base64>``, or any other string as UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_destination(url: str, *, allow_private: bool) -> None:
    """Refuse URLs whose host resolves to loopback, private, link-local or reserved addresses."""
    host = urlsplit(url).hostname or ""
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise WebhookRefused(f"callback host {host!r} does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if (
            address.is_loopback
            or address.is_private
            or address.is_link_local
            or address.is_reserved
            or address.is_multicast
            or address.is_unspecified
        ):
            raise WebhookRefused(
                f"callback host {host!r} resolves to a non-public address ({address}); "
                "set DISTILL_WEBHOOK_ALLOW_PRIVATE to allow it"
            )


def retry_policy(retry_seconds: int) -> Retry:
    """Doubling intervals from 1 s until their sum reaches ``retry_seconds``."""
    intervals: list[int] = []
    step = 1
    while sum(intervals) + step <= retry_seconds:
        intervals.append(step)
        step = min(step * 2, 3600)
    return Retry(max=max(len(intervals), 1), interval=intervals or [1])


def record_fields(settings: Settings, callback_url: str) -> dict[str, str | int]:
    """What a job record keeps so that whoever ends the job can queue its event."""
    return {
        "callback_url": callback_url,
        "webhook_queue": queue_name(settings),
        "webhook_retry_seconds": settings.webhook_retry_seconds,
    }


def enqueue(redis: Redis, job_id: str, *, queue: str, retry_seconds: int, ttl: int) -> None:
    """Queue the delivery of a job's terminal event."""
    Queue(queue, connection=redis).enqueue(
        keys.DELIVER_TASK,
        job_id,
        job_timeout=int(TIMEOUT_S * 3),
        result_ttl=ttl,
        failure_ttl=ttl,
        retry=retry_policy(retry_seconds),
    )


def attempts(redis: Redis, job_id: str) -> list[dict[str, Any]]:
    raw: list[bytes] = redis.lrange(keys.webhook_attempts(job_id), 0, -1)  # type: ignore[assignment]
    return [json.loads(x) for x in raw]
