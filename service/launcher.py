"""``make run``: an embedded Redis, one worker, the webhook sender and the API, together.

Redis is a private ``redis-server`` child on 127.0.0.1 (append-only file under the data
directory), skipped when ``DISTILL_REDIS_URL`` is set. Ctrl-C or SIGTERM stops everything;
if any child exits on its own (a worker that cannot load its model, say), the rest are
stopped too and its exit status is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

from core.settings import settings_or_exit
from service import stack
from service.redis_server import EmbeddedRedis

GRACE_SECONDS = 30.0


def _say(message: str) -> None:
    print(f"distill: {message}", file=sys.stderr, flush=True)


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for name, proc in children.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop within {GRACE_SECONDS:.0f} s; killing it")
            proc.kill()
            proc.wait()


def main() -> int:
    settings = settings_or_exit("distill")
    redis: EmbeddedRedis | None = None
    if "DISTILL_REDIS_URL" not in os.environ:
        redis = EmbeddedRedis(settings.data_dir / "redis").start()
        settings = settings.model_copy(update={"redis_url": redis.url})
        _say(f"embedded Redis on {redis.url} (data in {settings.data_dir / 'redis'})")
    else:
        _say(f"using Redis at {settings.redis_url}")

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # Own sessions: a terminal's Ctrl-C reaches only this process, which stops the children
    # in order (API and worker first, Redis last).
    worker_settings = settings
    if settings.workers > 1 and settings.torch_threads is None:
        # Several workers on one machine: one torch thread each, so they do not fight over
        # cores (GPU workers each claim their own GPU anyway).
        worker_settings = settings.model_copy(update={"torch_threads": 1})
    children: dict[str, subprocess.Popen[bytes]] = {
        **{
            f"worker-{n}": stack.spawn("worker", worker_settings, new_session=True)
            for n in range(1, settings.workers + 1)
        },
        "api": stack.spawn("service", settings, new_session=True),
        "webhooks": stack.spawn("worker.webhooks", settings, new_session=True),
    }
    _say(
        f"API on http://{settings.host}:{settings.port}  model: {settings.model}  "
        f"workers: {settings.workers}  (Ctrl-C stops)"
    )
    code = 0
    try:
        while not stopping:
            exited = {name: p.returncode for name, p in children.items() if p.poll() is not None}
            if exited:
                name, code = next(iter(exited.items()))
                _say(f"{name} exited with status {code}; stopping the rest")
                break
            time.sleep(0.2)
    finally:
        _stop(children)
        if redis is not None:
            redis.stop()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
