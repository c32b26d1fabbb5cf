"""Tests of the Python client and the ``distill`` command line against the real stack.

``live_api`` starts ``python -m service`` on a free port, on the session's Redis, queue and
data directory (so the session's ``worker`` runs its jobs), with API keys on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.settings import Settings
from service.redis_server import free_port
from tests.conftest import ROOT, settings_env, stop_worker, wait_until_serving

API_KEY = "client-test-key"
OTHER_KEY = "client-other-key"


@contextmanager
def live_api(settings: Settings, model: Path, log: Path, **env: str) -> Iterator[str]:
    """The API as a subprocess on a free port; yields its base URL. ``env`` adds variables."""
    port = free_port()
    environment = {
        **settings_env(settings, model),
        "DISTILL_PORT": str(port),
        "DISTILL_LOG_LEVEL": "WARNING",
        "DISTILL_API_KEYS": f"{API_KEY},{OTHER_KEY}",
        **env,
    }
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=environment,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/healthz", proc, log)
        yield base
    finally:
        stop_worker(proc)
