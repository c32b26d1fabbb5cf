"""ASGI guard for request bodies: JSON only (415), and no larger than the limit (413).

It runs before FastAPI reads the body, so an oversized upload is refused without buffering it.
Upload routes (``uploads``: reference-set archives) are let through: they are not JSON and
enforce their own, larger limit while they stream the body.
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, UnsupportedMediaType, problem_response

_WITH_BODY = {"POST", "PUT", "PATCH"}


class BodyGuard:
    def __init__(self, app: ASGIApp, *, max_bytes: int, uploads: Collection[str] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = frozenset(uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _WITH_BODY
            or scope["path"] in self.uploads
        ):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        json_api = scope["path"].startswith("/v1/")
        if json_api and has_body and media != "application/json" and not media.endswith("+json"):
            shown = media or "none"
            media_error = UnsupportedMediaType(f"send the body as application/json (got {shown})")
            await self._refuse(scope, receive, send, media_error)
            return
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            size_error = PayloadTooLarge(f"body of {length} bytes exceeds {self.max_bytes} bytes")
            await self._refuse(scope, receive, send, size_error)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside FastAPI's body reading, which passes HTTPException through
                    # to the problem+json handlers.
                    raise HTTPException(413, detail=f"body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, error: PayloadTooLarge | UnsupportedMediaType
    ) -> None:
        response = problem_response(error.status, error.title, error.detail)
        await response(scope, receive, send)
