"""Where the time of one status read goes: ``GET /v1/jobs/{id}`` through the ASGI app alone.

    python bench/status_profile.py [--requests 2000] [--top 25] [--json out.json]

Starts a private Redis, builds the API (``service.app.create_app``, its lifespan included) on
a queue no worker listens to, submits one job through it, then reads that job's status
``--requests`` times by calling the ASGI app directly (no socket, no HTTP parser, no client),
once plain (wall and CPU time per request) and once under cProfile (the functions that take
the time, by cumulative time or ``--sort``). What the HTTP server and the clients add comes
on top; the load test (``bench/loadtest.py``) measures the whole.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402
from service.app import create_app  # noqa: E402
from service.redis_server import EmbeddedRedis  # noqa: E402

JOB = {"labels": ["cat", "dog"], "ipc": 5, "augment": {"policy": "paper", "copies": 4}}


async def call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request through the ASGI app: its status and body."""
    headers = [(b"host", b"bench")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def run(app: Any, requests: int, top: int, sort: str) -> dict[str, Any]:
    async with app.router.lifespan_context(app):
        status, body = await call(app, "POST", "/v1/jobs", json.dumps(JOB).encode())
        assert status == 202, body
        path = f"/v1/jobs/{json.loads(body)['id']}"
        for _ in range(50):  # warm: imports, caches, the Redis connection
            assert (await call(app, "GET", path))[0] == 200
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            await call(app, "GET", path)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(requests):
            await call(app, "GET", path)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(top)
    return {
        "requests": requests,
        "wall_ms_per_request": round(1000 * wall / requests, 3),
        "cpu_ms_per_request": round(1000 * cpu / requests, 3),
        "profile": text.getvalue(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--sort", default="cumulative", help="pstats order: cumulative, tottime, ..."
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        redis = EmbeddedRedis(work / "redis", persist=False).start()
        try:
            settings = Settings(
                redis_url=redis.url,
                data_dir=work / "data",
                queue_name="status-profile",
                log_level="WARNING",
            )
            result = asyncio.run(run(create_app(settings), args.requests, args.top, args.sort))
        finally:
            redis.stop()
    print(result.pop("profile"))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
