"""The webhook sender: ``python -m service.webhooks`` drains ``DISTILL_WEBHOOK_QUEUE_NAME``.

GPU workers never deliver, so a slow or dead receiver cannot delay jobs or cancellation.
What an event holds and how it is signed: ``core.webhooks``. No torch here.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import httpx
from redis import Redis
from rq import Queue, SimpleWorker

from core import keys, logs, records
from core.records import JobRecord
from core.settings import get_settings, settings_or_exit
from core.states import JobState
from core.webhooks import TIMEOUT_S, WebhookRefused, check_destination, queue_name, sign

log = logging.getLogger(__name__)


def event(record: JobRecord) -> dict[str, Any]:
    """The event body for a job's terminal state."""
    state = record.outcome.value if record.outcome else "unknown"
    data: dict[str, Any] = {"id": record.id, "state": state}
    if record.outcome is JobState.succeeded:
        data["archive"] = {
            "url": record.archive_url or "",
            "size_bytes": record.archive_size or 0,
            "sha256": record.archive_sha256 or "",
        }
    if record.error_type:
        data["error"] = {"type": record.error_type, "detail": record.error_detail or ""}
    finished = repr(record.finished_at) if record.finished_at is not None else None
    return {"type": f"job.{state}", "timestamp": finished, "data": data}


def deliver(job_id: str) -> int:
    """POST the job's event to its callback URL; raises (so RQ retries) unless it got a 2xx."""
    settings = get_settings()
    redis = Redis.from_url(settings.redis_url)
    record = records.read(redis, job_id)
    url = record.callback_url if record is not None else None
    if record is None or not url or settings.webhook_secret is None:
        return 0
    body = json.dumps(event(record), separators=(",", ":")).encode()
    outcome = record.outcome.value if record.outcome else None
    msg_id = "msg_" + uuid.uuid5(uuid.NAMESPACE_URL, f"{job_id}:{outcome}").hex
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(
            settings.webhook_secret.get_secret_value(), msg_id, timestamp, body
        ),
        "user-agent": "distill-service-webhooks",
    }
    attempt: dict[str, Any] = {"at": time.time(), "url": url}
    try:
        check_destination(url, allow_private=settings.webhook_allow_private)
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S)
        attempt["status_code"] = response.status_code
        ok = 200 <= response.status_code < 300
        if not ok:
            attempt["error"] = f"receiver answered {response.status_code}"
    except (httpx.HTTPError, WebhookRefused) as exc:
        ok = False
        attempt["error"] = f"{type(exc).__name__}: {exc}"
    redis.rpush(keys.webhook_attempts(job_id), json.dumps(attempt))
    redis.expire(keys.webhook_attempts(job_id), settings.result_ttl + records.TOMBSTONE_S)
    log.info(
        "webhook attempt",
        extra={"job_id": job_id, "delivered": ok, "status": attempt.get("status_code")},
    )
    if not ok:
        raise RuntimeError(attempt["error"])
    return int(attempt["status_code"])


def main() -> int:
    """The webhook worker: many can run; each delivers one event at a time."""
    settings = settings_or_exit("distill webhooks")
    logs.configure(settings.log_level)
    redis = Redis.from_url(settings.redis_url)
    worker = SimpleWorker([Queue(queue_name(settings), connection=redis)], connection=redis)
    worker.work(with_scheduler=True, logging_level=settings.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
