"""The worker process's warm state, set up once by ``worker.main`` and read by each job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings
    from worker.generator import Generator


@dataclass
class Runtime:
    generator: Generator
    settings: Settings
    worker_name: str


_current: Runtime | None = None


def install(runtime: Runtime) -> None:
    """Make ``runtime`` the one jobs in this process use."""
    global _current
    _current = runtime


def current() -> Runtime:
    """The installed runtime; jobs can only run inside a worker that loaded a model."""
    if _current is None:
        raise RuntimeError("no model loaded in this process: jobs run inside `python -m worker`")
    return _current
