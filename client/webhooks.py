"""Webhook signatures in the Standard Webhooks scheme (https://www.standardwebhooks.com).

A webhook carries three headers:

    webhook-id           a unique message id (the same on redelivery: use it to drop duplicates)
    webhook-timestamp    Unix seconds when it was sent
    webhook-signature    "v1,<base64 HMAC-SHA256>", several separated by spaces (key rotation)

The HMAC key is the secret: ``whsec_<base64>`` is base64-decoded, any other string is used as
its UTF-8 bytes. The signed content is ``f"{webhook_id}.{timestamp}.{body}"`` over the raw body
bytes, exactly as received (verify before parsing the JSON).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from client.errors import WebhookVerificationError

#: Seconds a webhook's timestamp may be off from now, either way.
TOLERANCE_SECONDS = 5 * 60
SECRET_PREFIX = "whsec_"


def _key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a 'whsec_' secret must be followed by base64") from exc
    if not secret:
        raise ValueError("the webhook secret is empty")
    return secret.encode()


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def signature(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The base64 HMAC-SHA256 of ``{msg_id}.{timestamp}.{body}`` under ``secret``."""
    content = f"{msg_id}.{timestamp}.".encode() + _as_bytes(body)
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def sign_webhook(
    body: bytes | str,
    secret: str,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The three headers that sign ``body``: ``webhook-id``, ``webhook-timestamp`` and
    ``webhook-signature`` (``v1,<base64>``). ``msg_id`` defaults to a fresh ``msg_<uuid>``,
    ``timestamp`` to now."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + signature(secret, msg_id, timestamp, body),
    }


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str,
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a webhook's signature and timestamp; return its JSON payload.

    ``headers`` may use any letter case; ``body`` must be the raw request body. Raises
    ``WebhookVerificationError`` when a header is missing, the timestamp is more than
    ``tolerance`` seconds from ``now`` (a replay), no ``v1`` signature matches (compared in
    constant time), or the body is not a JSON object.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        raw_timestamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is {current - timestamp:+.0f} s from now "
            f"(tolerance {tolerance:g} s)"
        )
    try:
        expected = signature(secret, msg_id, timestamp, body).encode()
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from None
    matched = False
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1":  # no early exit: every candidate is compared
            matched |= hmac.compare_digest(value.encode(), expected)
    if not matched:
        raise WebhookVerificationError("no matching v1 signature")
    try:
        payload = json.loads(_as_bytes(body))
    except ValueError:
        raise WebhookVerificationError("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return payload
