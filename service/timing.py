"""``Server-Timing: app;dur=<ms>`` on every HTTP response: the milliseconds from the request
reaching the application to its response starting (W3C Server Timing).

A client (or ``bench/loadtest.py``) can then tell the time the service spent on a request
from the time it waited elsewhere: in the network, in the server's accept queue or event
loop, or in the client itself.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServerTiming:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"app;dur={ms:.3f}".encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)
