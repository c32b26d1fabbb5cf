"""The API these tests talk to: ``python -m service`` as a subprocess (see ``live_api``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from tests.conftest import live_api


@pytest.fixture(scope="module")
def api(
    worker: subprocess.Popen[bytes],
    stack_settings: Settings,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """One API per test module, on the session's Redis, queue and worker."""
    log = tmp_path_factory.mktemp("client-api") / "api.log"
    with live_api(stack_settings, tiny_model, log) as base:
        yield base
