"""Optional API keys: ``DISTILL_API_KEYS`` on means ``Authorization: Bearer <key>`` everywhere
but the health routes, and each key sees only its own jobs.

A caller is known by an owner id derived from its key (a hash prefix), never by the key itself:
keys are not stored in Redis, not logged, and compared in constant time against every key.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from core.settings import Settings, api_key_list
from service.errors import Unauthorized

PUBLIC = "public"


async def owner_for(request: Request) -> str:
    """The caller's owner id; raises ``Unauthorized`` when keys are on and this one is not.

    A coroutine because it never blocks (a few constant-time comparisons): a plain ``def``
    dependency would cost every request a hop through the threadpool."""
    settings: Settings = request.app.state.settings
    if not api_key_list(settings):
        return PUBLIC
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    return owner_for_key(settings, token.strip())


def owner_for_key(settings: Settings, token: str | None) -> str:
    """The owner id of ``token``; PUBLIC when keys are off; ``Unauthorized`` when unknown."""
    keys = api_key_list(settings)
    if not keys:
        return PUBLIC
    if not token:
        raise Unauthorized("an API key is required")
    matched = False
    for key in keys:  # no early exit: the time taken does not say which key matched
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if not matched:
        raise Unauthorized("the API key is not valid")
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:16]


OwnerDep = Annotated[str, Depends(owner_for)]
