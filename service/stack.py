"""A whole service as child processes: Redis, N workers, the API, the webhook sender.

The launcher (``make run``), the tests and the benchmarks all start their processes here, so
there is one way to do it. Each child gets its configuration as ``DISTILL_*`` variables made
from a ``Settings`` object field by field (``settings_env``), never mapped by hand, so a child
sees exactly the settings its parent holds.

    with Stack(settings, logs=Path("logs")) as stack:      # Redis from settings.redis_url
        stack.start_worker()                                # waits until its model is loaded
        base = stack.start_api()                            # waits until it answers
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import SecretStr
from redis import Redis

from core import models, workers
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
#: How long a worker may take to load its model before ``start_worker`` gives up.
WORKER_START_S = 120.0
API_START_S = 30.0


def _text(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value.absolute())  # children may run in another directory
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """``DISTILL_<FIELD>`` for every field of ``settings`` that was set (from the environment,
    by a caller, or by ``model_copy(update=...)``); the child's defaults are the parent's."""
    return {
        f"DISTILL_{name.upper()}": _text(value)
        for name in sorted(settings.model_fields_set)
        if (value := getattr(settings, name)) is not None
    }


def child_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its own ``DISTILL_*`` variables, plus ``settings``
    and ``extra``; the project root is importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(settings_env(settings))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def spawn(
    module: str,
    settings: Settings,
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """``python -m module`` with ``settings``; output to ``log`` (default: inherited)."""
    handle = open(log, "wb") if log is not None else None  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            env=child_env(settings, env),
            stdout=handle,
            stderr=subprocess.STDOUT if handle is not None else None,
            start_new_session=new_session,
        )
    finally:
        if handle is not None:
            handle.close()


def _log_text(log: Path | None) -> str:
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


def wait_for_worker(
    proc: subprocess.Popen[bytes],
    settings: Settings,
    *,
    log: Path | None = None,
    timeout: float = WORKER_START_S,
) -> None:
    """Wait until the worker ``proc`` is in its model's queue registry with its model loaded."""
    redis = Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited early ({proc.returncode}):\n{_log_text(log)}")
            live = [
                w
                for queue in models.queues(settings)
                for w in workers.live(redis, queue, heartbeat_ttl=settings.heartbeat_ttl)
            ]
            if any(w.ready and w.pid == proc.pid for w in live):
                return
            time.sleep(0.1)
    finally:
        redis.close()
    proc.kill()
    raise TimeoutError(f"worker did not load its model in {timeout:.0f} s:\n{_log_text(log)}")


def wait_until_serving(
    url: str, proc: subprocess.Popen[bytes], log: Path | None = None, *, timeout: float = 30.0
) -> None:
    """Wait until the child ``proc`` answers HTTP ``url`` with anything but a server error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not start serving {url}:\n{_log_text(log)}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], *, grace: float = 20.0) -> int:
    """Stop a child: SIGTERM, then SIGKILL after ``grace`` seconds; returns its status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Stack:
    """Workers, an API and a webhook sender on ``settings.redis_url``, stopped together.

    ``logs``: a directory for each child's output (``worker-1.log``, ``api.log``, ...).
    ``env``: extra variables for every child (``HF_HUB_OFFLINE``, say).
    """

    def __init__(
        self, settings: Settings, *, logs: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.logs = logs
        self.env = dict(env or {})
        self.workers: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start_worker(self, *, wait: bool = True, **settings: Any) -> subprocess.Popen[bytes]:
        """One more worker (``settings`` override fields for it alone)."""
        log = self.logs / f"worker-{len(self.workers) + 1}.log"
        own = self.settings.model_copy(update=settings)
        proc = spawn("worker", own, log=log, env=self.env)
        self.workers.append(proc)
        if wait:
            wait_for_worker(proc, own, log=log)
        return proc

    def start_api(self, **settings: Any) -> str:
        """The API (``python -m service``) on ``settings.port``; returns its base URL."""
        own = self.settings.model_copy(update=settings)
        log = self.logs / f"api-{len(self.others) + 1}.log"
        proc = spawn("service", own, log=log, env=self.env)
        self.others.append(proc)
        base = f"http://{own.host}:{own.port}"
        wait_until_serving(f"{base}/healthz", proc, log, timeout=API_START_S)
        return base

    def start_webhooks(self) -> subprocess.Popen[bytes]:
        """The webhook sender (``python -m service.webhooks``)."""
        proc = spawn(
            "service.webhooks",
            self.settings,
            log=self.logs / f"webhooks-{len(self.others) + 1}.log",
            env=self.env,
        )
        self.others.append(proc)
        return proc

    def close(self) -> None:
        for proc in [*self.others, *self.workers]:
            stop(proc)

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
