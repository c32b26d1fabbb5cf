"""The worker process's warm state, set up once by ``worker.main`` and read by each job."""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings
    from worker.model.classifier import Classifier
    from worker.model.clip import ClipModel
    from worker.model.generator import Generator


@dataclass
class Runtime:
    generator: Generator
    settings: Settings
    worker_name: str
    #: The post-processing pool, kept for the worker's lifetime (None: each job makes one).
    pool: Executor | None = None
    #: Images per pipeline call (``DISTILL_BATCH_SIZE``, or what the worker found fastest).
    batch_size: int = 8
    #: The CLIP model of ``select.scorer: clip`` (None: this worker runs without it).
    clip: ClipModel | None = None
    #: The pretrained soft-label teachers it loaded, by their DISTILL_TEACHERS name.
    teachers: dict[str, Classifier] = field(default_factory=dict)


_current: Runtime | None = None
_stop = threading.Event()
_interrupted: set[str] = set()
_rate: list[float] = []


def install(runtime: Runtime) -> None:
    """Make ``runtime`` the one jobs in this process use."""
    global _current
    _current = runtime


def request_stop() -> None:
    """The worker is shutting down: running jobs stop after their current batch."""
    _stop.set()


def stopping() -> bool:
    return _stop.is_set()


def mark_interrupted(job_id: str) -> None:
    """The job stopped early for a shutdown; the worker puts it back at the queue's front."""
    _interrupted.add(job_id)


def take_interrupted(job_id: str) -> bool:
    if job_id in _interrupted:
        _interrupted.discard(job_id)
        return True
    return False


def record_rate(images_per_second: float) -> None:
    """Output images per second of the last job or shard (advertised in the heartbeat)."""
    _rate[:] = [images_per_second]


def last_rate() -> float | None:
    return _rate[0] if _rate else None


def current() -> Runtime:
    """The installed runtime; jobs can only run inside a worker that loaded a model."""
    if _current is None:
        raise RuntimeError("no model loaded in this process: jobs run inside `python -m worker`")
    return _current
