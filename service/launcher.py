"""``make run``: an embedded Redis, one worker, the webhook sender and the API, together.

Redis is a private ``redis-server`` child on 127.0.0.1 (append-only file under the data
directory), skipped when ``DISTILL_REDIS_URL`` is set. Ctrl-C or SIGTERM stops everything.

A worker or the webhook sender that exits on its own (killed for memory, say) is started again
after a backoff (1 s, doubling to 30 s; back to 1 s once one has run for a minute), with a
line saying so; its job goes back to the queue as when any worker dies, and the API answers
throughout. A child that exits 2 failed at start (a model that cannot be loaded, a bad
setting): that will not mend itself, so everything stops with its one-line reason and status,
as it does when the API itself exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

from core import models
from core.settings import Settings, settings_or_exit
from service import stack
from service.redis_server import EmbeddedRedis

GRACE_SECONDS = 30.0
#: Restart backoff: first delay, longest delay, and how long a run resets it.
BACKOFF_S = (1.0, 30.0)
STEADY_S = 60.0
#: A child's exit status that means "cannot start" (ours: settings_or_exit, model loading).
START_FAILURE = 2


class Child:
    """One supervised process: what it runs, its current process, and its restart backoff."""

    def __init__(self, name: str, module: str, settings: Settings, *, restart: bool) -> None:
        self.name, self.module, self.settings, self.restart = name, module, settings, restart
        self.delay = BACKOFF_S[0]
        self.due: float | None = None
        self.proc = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        self.started = time.monotonic()
        self.due = None
        return stack.spawn(self.module, self.settings, new_session=True)

    def exited(self) -> int | None:
        """Its exit status once it ended and has not been restarted since."""
        return None if self.due is not None else self.proc.poll()

    def schedule_restart(self) -> float:
        """Restart after the backoff; returns the delay."""
        if time.monotonic() - self.started >= STEADY_S:
            self.delay = BACKOFF_S[0]
        delay = self.delay
        self.due = time.monotonic() + delay
        self.delay = min(self.delay * 2, BACKOFF_S[1])
        return delay

    def tick(self) -> None:
        if self.due is not None and time.monotonic() >= self.due:
            self.proc = self.start()
            _say(f"{self.name} restarted (pid {self.proc.pid})")


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


def _supervise(children: list[Child]) -> int:
    """One look at every child: restart the ones that may be restarted; a nonzero status when
    everything must stop."""
    for child in children:
        child.tick()
        status = child.exited()
        if status is None:
            continue
        if not child.restart or status == START_FAILURE:
            _say(f"{child.name} exited with status {status}; stopping the rest")
            return status or 1
        delay = child.schedule_restart()
        _say(f"{child.name} exited with status {status}; restarting it in {delay:.0f} s")
    return 0


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
    # DISTILL_WORKERS workers per served model, each told its alias (core.models).
    served: list[str | None] = list(models.catalogue(settings)) if settings.models else [None]
    children = [
        *(
            Child(
                f"worker-{alias}-{n}" if alias else f"worker-{n}",
                "worker",
                worker_settings.model_copy(update={"model": alias}) if alias else worker_settings,
                restart=True,
            )
            for alias in served
            for n in range(1, settings.workers + 1)
        ),
        Child("api", "service", settings, restart=False),
        Child("webhooks", "service.webhooks", settings, restart=True),
    ]
    names = ", ".join(models.catalogue(settings)) if settings.models else settings.model
    _say(
        f"API on http://{settings.host}:{settings.port}  model(s): {names}  "
        f"workers: {settings.workers}{' per model' if settings.models else ''}  (Ctrl-C stops)"
    )
    code = 0
    try:
        while not stopping and (code := _supervise(children)) == 0:
            time.sleep(0.2)
    finally:
        _stop({child.name: child.proc for child in children})
        if redis is not None:
            redis.stop()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
